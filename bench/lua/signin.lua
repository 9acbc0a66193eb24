-- POST /oauth/token, grant_type=password, for one user.
local function urlencode(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.body = "grant_type=password&username=" .. urlencode(os.getenv("AUTHGATE_BENCH_EMAIL"))
  .. "&password=" .. urlencode(os.getenv("AUTHGATE_BENCH_PASSWORD"))
