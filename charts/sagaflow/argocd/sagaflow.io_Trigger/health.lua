-- Argo CD health check for sagaflow.io/Trigger.
-- spec.suspend true -> Suspended; otherwise Healthy. A trigger has no failed state of
-- its own: a message it cannot turn into a run is dead-lettered, counted in its
-- status and posted as an Event. The message gives the counts once there are any.
local hs = {}

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Trigger suspended"
  return hs
end

hs.status = "Healthy"
hs.message = "Trigger active"
local status = obj.status
if status ~= nil then
  local started = status.started or 0
  local signalled = status.signalled or 0
  local filtered = status.filtered or 0
  local dead = status.deadLettered or 0
  if started + signalled + filtered + dead > 0 then
    hs.message = string.format(
      "%d started, %d signalled, %d filtered, %d dead-lettered", started, signalled, filtered, dead
    )
  end
end
return hs
