-- The benchmarks' load for wrk (benchmarks/wrk.py writes the run's settings and starts wrk with this script).
--
-- Each request is valid and unique, as the Python generator sends it: a transfer of 1 minor unit between a
-- pair of accounts from the run's table (or a read of one account), a fresh Idempotency-Key per request, and
-- the headers the target requires:
--   auth = "client": the client's own token in `authorization` (through the router);
--   auth = "hop":    a hop token bound to this very request in `authorization`, minted here as the router
--                    mints it (EdDSA over the JWT, SHA-256 of the body as `bdh`), plus the client's token in
--                    x-client-authorization (straight to a regional service). The signing runs in OpenSSL's
--                    libcrypto through LuaJIT's FFI: compiled code, like the router's own signing.
-- done() prints one parseable line (`txroute-wrk {...}`: counts, and wrk's percentiles in microseconds) and
-- writes the whole latency histogram ("<microseconds> <count>" lines) to the run's histogram file, so runs of
-- one workload can be merged exactly. wrk has already applied its coordinated-omission correction to both (it
-- adds synthetic samples below every latency over twice the mean interval); benchmarks/wrk.py reverts it, so
-- the figures are the measured latencies, as the Python generator's and pgbench's are.

local settings = dofile(os.getenv("TXROUTE_WRK_SETTINGS"))

local thread_number = 0
local threads = {}
local counter = 0
local sign = nil

local function b64url(raw)
  local ffi = require("ffi")
  local out = ffi.new("unsigned char[?]", 4 * math.ceil(#raw / 3) + 1)
  local n = sign.crypto.EVP_EncodeBlock(out, raw, #raw)
  return (ffi.string(out, n):gsub("[+/=]", { ["+"] = "-", ["/"] = "_", ["="] = "" }))
end

local function libcrypto()
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct evp_pkey_st EVP_PKEY;
    typedef struct evp_md_ctx_st EVP_MD_CTX;
    EVP_PKEY *EVP_PKEY_new_raw_private_key(int type, void *engine, const unsigned char *key, size_t keylen);
    EVP_MD_CTX *EVP_MD_CTX_new(void);
    int EVP_DigestSignInit(EVP_MD_CTX *ctx, void **pctx, const void *type, void *engine, EVP_PKEY *pkey);
    int EVP_DigestSign(EVP_MD_CTX *ctx, unsigned char *sig, size_t *siglen, const unsigned char *tbs, size_t tbslen);
    unsigned char *SHA256(const unsigned char *data, size_t n, unsigned char *md);
    int EVP_EncodeBlock(unsigned char *out, const unsigned char *in, int n);
  ]]
  return ffi.load("libcrypto.so.3")
end

local function signer(crypto, raw_key_hex)
  local ffi = require("ffi")
  local raw_key = raw_key_hex:gsub("..", function(h) return string.char(tonumber(h, 16)) end)
  local EVP_PKEY_ED25519 = 1087
  local pkey = crypto.EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nil, raw_key, 32)
  assert(pkey ~= nil, "libcrypto refused the hop key")
  return {
    crypto = crypto,
    pkey = pkey,
    ctx = crypto.EVP_MD_CTX_new(),
    signature = ffi.new("unsigned char[64]"),
    length = ffi.new("size_t[1]"),
    digest = ffi.new("unsigned char[32]"),
  }
end

local function sha256_b64url(data)
  local ffi = require("ffi")
  sign.crypto.SHA256(data, #data, sign.digest)
  return b64url(ffi.string(sign.digest, 32))
end

local JWT_HEADER = nil

local function hop_token(method, target, body, idempotency_key)
  local ffi = require("ffi")
  local now = os.time()
  local claims = string.format(
    '{"iss":"txroute-router","aud":"txroute-region","sub":"%s","scope":"%s","iat":%d,"exp":%d,'
      .. '"htm":"%s","htu":"%s","bdh":"%s"%s}',
    settings.client, settings.scope, now, now + settings.hop_lifetime_s, method, target, sha256_b64url(body),
    idempotency_key and string.format(',"idk":"%s"', idempotency_key) or "")
  local input = JWT_HEADER .. "." .. b64url(claims)
  sign.length[0] = 64
  assert(sign.crypto.EVP_DigestSignInit(sign.ctx, nil, nil, nil, sign.pkey) == 1)
  assert(sign.crypto.EVP_DigestSign(sign.ctx, sign.signature, sign.length, input, #input) == 1)
  return input .. "." .. b64url(ffi.string(sign.signature, sign.length[0]))
end

function setup(thread)
  thread:set("number", thread_number)
  thread_number = thread_number + 1
  table.insert(threads, thread)
end

function init(args)
  local crypto = libcrypto()
  -- Client-token runs sign nothing; the key of zeros only gives the helpers their buffers.
  sign = signer(crypto, settings.hop_key_hex or string.rep("00", 32))
  JWT_HEADER = b64url('{"alg":"EdDSA","typ":"JWT"}')
  counter = number -- request i of thread n of T: n, n + T, n + 2T ... (like the Python generator's clients)
end

local function headers_for(method, target, body, idempotency_key)
  local headers = {}
  if settings.auth == "hop" then
    headers["authorization"] = "Bearer " .. hop_token(method, target, body, idempotency_key)
    headers["x-client-authorization"] = settings.client_authorization
  else
    headers["authorization"] = settings.client_authorization
  end
  return headers
end

function request()
  local i = counter
  counter = counter + settings.threads
  if settings.mode == "read" then
    local path = "/v1/accounts/" .. settings.accounts[(i % #settings.accounts) + 1]
    return wrk.format("GET", path, headers_for("GET", path, "", nil), nil)
  end
  local pair = settings.pairs[(i % #settings.pairs) + 1]
  local body = string.format('{"debit_account":"%s","credit_account":"%s","amount":1,"currency":"%s"}',
    pair[1], pair[2], settings.currency)
  local key = string.format("%s-%d", settings.key_prefix, i)
  local headers = headers_for("POST", settings.path, body, key)
  headers["idempotency-key"] = key
  headers["content-type"] = "application/json"
  return wrk.format("POST", settings.path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  print(string.format(
    'txroute-wrk {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,'
      .. '"status_errors":%d,"timeouts":%d,"corrected_p50_us":%d,"corrected_p90_us":%d,"corrected_p99_us":%d,'
      .. '"max_us":%d}',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
  local out = assert(io.open(settings.histogram, "w"))
  for n = 1, #latency do
    local value, count = latency(n)
    if count > 0 then
      out:write(string.format("%d %d\n", value, count))
    end
  end
  out:close()
end
