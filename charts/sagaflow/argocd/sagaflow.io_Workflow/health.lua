-- Argo CD health check for sagaflow.io/Workflow.
-- Ready=True for the current generation -> Healthy; Ready=False -> Degraded;
-- anything else (no status yet, an older generation, Ready=Unknown) -> Progressing.
local hs = {}

local ready = nil
if obj.status ~= nil and obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = nil
if obj.status ~= nil then
  observed = obj.status.observedGeneration
end

if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  if ready.message ~= nil and ready.message ~= "" then
    hs.message = ready.message
  elseif ready.reason ~= nil and ready.reason ~= "" then
    hs.message = ready.reason
  else
    hs.message = "Workflow is not ready"
  end
  return hs
end

if ready ~= nil and ready.status == "True" then
  if generation ~= nil and observed ~= nil and observed == generation then
    hs.status = "Healthy"
    if ready.message ~= nil and ready.message ~= "" then
      hs.message = ready.message
    else
      hs.message = "Workflow is ready"
    end
    return hs
  end
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

hs.status = "Progressing"
hs.message = "Waiting for the operator to validate the workflow"
return hs
