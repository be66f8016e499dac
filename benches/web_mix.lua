-- 90 % fast requests to /, 10 % to /slow (50 ms), in a fixed pseudo-random order.
local counter = 0
request = function()
  counter = counter + 1
  if counter % 10 == 0 then
    return wrk.format("GET", "/slow")
  end
  return wrk.format("GET", "/")
end
