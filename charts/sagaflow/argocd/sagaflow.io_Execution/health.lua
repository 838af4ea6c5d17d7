-- Argo CD health check for sagaflow.io/Execution.
-- Completed -> Healthy; Failed, Cancelled, Compensated (undone after a failure or a
-- cancel) and CompensationFailed (an undo failed: someone must act) -> Degraded;
-- Suspended -> Suspended; anything else (no status yet, Pending, Running,
-- Compensating) -> Progressing. A CompensationFailed, Suspended or Progressing
-- Execution shows the Ready condition's message when it is False (which undo failed
-- and how to go on, what is held, a step waiting to retry, a workflow without a
-- valid version).
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

local function errorMessage(status)
  local err = status.error
  if type(err) == "table" and err.message ~= nil and err.message ~= "" then
    return err.message
  end
  if type(err) == "string" and err ~= "" then
    return err
  end
  return nil
end

local function failureMessage(status, phase)
  local message = errorMessage(status)
  if message ~= nil then
    return message
  end
  local condition = succeededCondition(status)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return "Execution " .. string.lower(phase)
end

-- The Ready condition's message when it is False, else `default`.
local function notReadyMessage(status, default)
  local ready = findCondition(status, "Ready")
  if ready ~= nil and ready.status == "False" and ready.message ~= nil and ready.message ~= "" then
    return ready.message
  end
  return default
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
elseif phase == "Compensated" then
  hs.status = "Degraded"
  local cause = errorMessage(obj.status)
  hs.message = "Execution compensated"
  if cause ~= nil then
    hs.message = "Execution compensated after: " .. cause
  end
elseif phase == "CompensationFailed" then
  hs.status = "Degraded"
  hs.message = notReadyMessage(obj.status, "Execution compensation failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = notReadyMessage(obj.status, "Execution suspended")
else
  hs.status = "Progressing"
  hs.message = notReadyMessage(obj.status, "Execution " .. string.lower(phase))
end
return hs
