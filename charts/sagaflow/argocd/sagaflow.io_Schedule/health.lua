-- Argo CD health check for sagaflow.io/Schedule.
-- spec.suspend true -> Suspended; otherwise Healthy. A schedule has no failed state of
-- its own: a run it started that fails shows on that Execution, and a skipped or
-- missed tick is an Event and a count in its status. The message names the next tick
-- once the operator has computed it.
local hs = {}

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Schedule suspended"
  return hs
end

hs.status = "Healthy"
if obj.status ~= nil and obj.status.nextScheduleTime ~= nil and obj.status.nextScheduleTime ~= "" then
  hs.message = "Next run at " .. obj.status.nextScheduleTime
else
  hs.message = "Schedule active"
end
return hs
