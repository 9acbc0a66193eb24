-- POST /oauth/token, grant_type=password. Each wrk thread owns one connection and signs in a
-- user of its own, as a server's concurrent sign-ins come from different users (one login id
-- admits only its free attempts at once: see core/throttle.py).
local counter = 0

local function urlencode(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

function setup(thread)
  counter = counter + 1
  thread:set("index", counter)
end

function init(args)
  local file = io.open(os.getenv("AUTHGATE_BENCH_EMAILS"))
  local n = 0
  for line in file:lines() do
    n = n + 1
    if n == index then email = line end
  end
  file:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  wrk.body = "grant_type=password&username=" .. urlencode(email)
    .. "&password=" .. urlencode(os.getenv("AUTHGATE_BENCH_PASSWORD"))
end
