-- Argo CD health check for sagaflow.io/Execution.
-- Completed -> Healthy; Failed, Cancelled -> Degraded; Suspended -> Suspended;
-- anything else (no status yet, Pending, Running, Compensating) -> Progressing, with
-- the Ready condition's message when it is False (a step waiting to retry, a workflow
-- without a valid version).
local hs = {}

local function findCondition(status, kind)
  if status.conditions ~= nil then
    for _, condition in ipairs(status.conditions) do
      if condition.type == kind then
        return condition
      end
    end
  end
  return nil
end

local function succeededCondition(status)
  return findCondition(status, "Succeeded")
end

local function failureMessage(status, phase)
  local err = status.error
  if type(err) == "table" and err.message ~= nil and err.message ~= "" then
    return err.message
  end
  if type(err) == "string" and err ~= "" then
    return err
  end
  local condition = succeededCondition(status)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return "Execution " .. string.lower(phase)
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to start the execution"
  return hs
end

local phase = obj.status.phase
if phase == "Completed" then
  hs.status = "Healthy"
  hs.message = "Execution completed"
elseif phase == "Failed" or phase == "Cancelled" then
  hs.status = "Degraded"
  hs.message = failureMessage(obj.status, phase)
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Execution suspended"
else
  hs.status = "Progressing"
  hs.message = "Execution " .. string.lower(phase)
  local ready = findCondition(obj.status, "Ready")
  if ready ~= nil and ready.status == "False" and ready.message ~= nil and ready.message ~= "" then
    hs.message = ready.message
  end
end
return hs
