"""The shared state on a Redis-protocol server (Redis or Valkey; REDIS_URL), for several replicas.

`apply` is one Lua script (one round trip, atomic on the server): the GCRA step of
`gateway.shared.gcra`, line by line, and the counters; its clock is the server's (`TIME`), so
replicas whose clocks differ still agree. An operation issued while nothing is queued or in flight
is sent at once from its own coroutine; otherwise operations issued in the same turn of the event
loop go in one call. Keys carry the caller in a hash tag (`llm-router:{vk_…}:r`); a call that carries
several callers' operations spans several slots, so the server must be one primary (with replicas
or Sentinel if you like), not a Redis Cluster.

The script goes over one pipelined connection of its own (`gateway.shared.pipe`: hiredis packs
and parses, no redis-py command machinery, which cost as much CPU as the round trip). It fails
fast: no answer within REDIS_TIMEOUT_S fails the call, and nothing is retried after a timeout (a
hung server would stall a request twice); only a connection the server closed is tried once more,
on a fresh one; a restarted server that lost the script gets it whole (EVAL after NOSCRIPT). The
guard (`gateway.shared.guarded`) turns a failure into per-replica limits. Pings, publishing and
notices use redis-py (pub/sub on a connection of its own, no read timeout: it waits for messages).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.shared import RESYNC, Cell, Op, Outcome, Rate, SharedStateDown
from gateway.shared.pipe import Lost, Pipe, ReplyError

# One call carries the operations of every request that reached the client in the same turn of
# the event loop (see `RedisState.apply`), each one atomic on its own (the whole script is).
# KEYS: every operation's keys, one per op, in order. ARGV[1]: the operations, newline-separated,
# each `nkeys<TAB>ops`, the ops `;`-separated, each `r,cost,limit,period_s,check(1/0)` or
# `s,amount,cap,ttl_s,seed` ('' for none). Returns the outcomes, newline-separated, each
# `applied|cell;cell;...`, a cell being `ok,value,reset_s,retry_s,missing`. Strings both ways:
# one argument and one string reply are the cheapest to pack, parse and decode (one call per turn
# of the event loop carries every queued operation).
APPLY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function run(base_key, spec)
  local ops = {}
  for one in string.gmatch(spec, '[^;]+') do
    local f = {}
    for v in string.gmatch(one .. ',', '([^,]*),') do f[#f + 1] = v end
    ops[#ops + 1] = f
  end
  local applied = 1
  local cells = {}
  local stands = {}  -- a passing op's cell as it stands, if the operation is refused
  local writes = {}
  for i = 1, #ops do
    local key = KEYS[base_key + i]
    local f = ops[i]
    if f[1] == 'r' then
      local cost, limit, period = tonumber(f[2]), tonumber(f[3]), tonumber(f[4])
      local check = f[5] == '1'
      local interval = period / limit
      local base = math.max(tonumber(redis.call('GET', key) or '0'), now)
      local new = base + cost * interval
      if cost < 0 and new < now then new = now end
      if check and cost > 0 and new - now > period + 0.000001 then
        applied = 0
        local retry = ''
        if cost <= limit then retry = string.format('%.6f', new - now - period) end
        local left = math.max(0, (now + period - base) / interval)
        cells[i] = string.format('0,%.6f,%.6f,%s,0', left, base - now, retry)
      else
        local left = math.max(0, (now + period - new) / interval)
        cells[i] = string.format('1,%.6f,%.6f,,0', left, math.max(0, new - now))
        stands[i] = string.format('1,%.6f,%.6f,,0', math.max(0, (now + period - base) / interval), base - now)
        writes[i] = {'r', string.format('%.6f', new), math.ceil(math.max(0.001, new - now) * 1000) + 1000}
      end
    else
      local amount, cap, ttl, seed = tonumber(f[2]), f[3], f[4], f[5]
      local current = redis.call('GET', key)
      if current == false and seed == '' then
        if amount ~= 0 then applied = 0 end
        cells[i] = (amount == 0 and '1' or '0') .. ',0,0,,1'
      else
        local fresh = current == false
        local value = tonumber(current or seed)
        local total = value + amount
        if cap ~= '' and amount > 0 and total > tonumber(cap) then
          applied = 0
          cells[i] = string.format('0,%.0f,0,,0', value)
        else
          cells[i] = string.format('1,%.0f,0,,0', total)
          stands[i] = string.format('1,%.0f,0,,0', value)
          if fresh then
            writes[i] = {'new', string.format('%.0f', total), ttl}
          elseif amount ~= 0 then
            writes[i] = {'add', string.format('%.0f', amount)}
          end
        end
      end
    end
  end
  if applied == 0 then
    for i, stand in pairs(stands) do cells[i] = stand end
  else
    for i = 1, #ops do
      local key, w = KEYS[base_key + i], writes[i]
      if w ~= nil then
        if w[1] == 'r' then
          redis.call('SET', key, w[2], 'PX', w[3])
        elseif w[1] == 'add' then
          redis.call('INCRBY', key, w[2])
        elseif w[3] ~= '' then
          redis.call('SET', key, w[2], 'EX', w[3])
        else
          redis.call('SET', key, w[2])
        end
      end
    end
  end
  return applied .. '|' .. table.concat(cells, ';')
end

local out = {}
local offset = 0
for line in string.gmatch(ARGV[1], '[^\\n]+') do
  local tab = string.find(line, '\\t', 1, true)
  local n = tonumber(string.sub(line, 1, tab - 1))
  out[#out + 1] = run(offset, string.sub(line, tab + 1))
  offset = offset + n
end
return table.concat(out, '\\n')
"""

_SHA = hashlib.sha1(APPLY.encode()).hexdigest()
_MAX_BATCH = 64  # operations in one call at most

# No CLIENT SETINFO round trips on every new connection.
_NO_SETINFO = DriverInfo(name=None, lib_version=None)
_FAILURES = (RedisError, ReplyError, OSError, TimeoutError, asyncio.TimeoutError)


def _opt(value: object | None) -> str:
    return "" if value is None else str(value)


def _encode(ops: Sequence[Op]) -> str:
    specs = []
    for op in ops:
        if isinstance(op, Rate):
            specs.append(f"r,{float(op.cost)!r},{op.limit},{float(op.period_s)!r},{1 if op.check else 0}")
        else:
            specs.append(f"s,{op.amount},{_opt(op.cap)},{_opt(op.ttl_s)},{_opt(op.seed)}")
    return ";".join(specs)


def _decode(raw: bytes | str) -> Outcome:
    text = raw.decode() if isinstance(raw, bytes) else raw
    applied, _, rest = text.partition("|")
    cells = []
    for spec in rest.split(";") if rest else ():
        ok, value, reset, retry, missing = spec.split(",")
        cells.append(
            Cell(ok == "1", float(value), float(reset), float(retry) if retry else None, missing == "1")
        )
    return Outcome(applied == "1", tuple(cells))


class RedisState:
    def __init__(self, url: str, *, timeout_s: float = 0.2, prefix: str = "llm-router:") -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.client = aredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # Once more on a fresh connection when a pooled one was closed (a restarted server);
            # never after a timeout (a hung server would stall the request twice).
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            max_connections=256,
            driver_info=_NO_SETINFO,
        )
        # Pub/sub waits for messages, so no read timeout; a dead server is noticed by its PINGs.
        self.listener = aredis.Redis.from_url(
            url,
            socket_connect_timeout=max(timeout_s, 1.0),
            socket_keepalive=True,
            health_check_interval=5,
            retry=Retry(NoBackoff(), 0),
            driver_info=_NO_SETINFO,
        )
        self.pipe = Pipe(url, timeout_s)
        self.queue: list[tuple[list[str], str, asyncio.Future[Outcome]]] = []
        self.sending: set[asyncio.Task[None]] = set()
        self.alone = 0  # operations sent at once, not queued (see `apply`), in flight

    def key(self, name: str) -> str:
        return self.prefix + name

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        """Sent at once when nothing else is queued or in flight (light load: no turn of the loop,
        no task, about 50 us less); otherwise queued, and sent with every other operation queued in
        the same turn of the event loop (under load one round trip serves many, which is what keeps
        the client's CPU per request low: a command costs about 40 us of CPU even on the pipe)."""
        if not ops:
            return Outcome(True, ())
        keys, spec = [self.key(op.key) for op in ops], _encode(ops)
        if not self.queue and not self.sending and not self.alone:
            # Nothing queued nor in flight: sent at once from here (no turn of the loop, no task,
            # the light-load case); operations issued meanwhile queue and go together.
            self.alone += 1
            try:
                raw = await self._run(keys, f"{len(keys)}\t{spec}")
            except _FAILURES as exc:
                raise SharedStateDown(f"{type(exc).__name__}: {exc}") from exc
            finally:
                self.alone -= 1
            return _decode(raw)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Outcome] = loop.create_future()
        self.queue.append((keys, spec, done))
        if len(self.queue) == 1:
            loop.call_soon(self._flush)
        elif len(self.queue) >= _MAX_BATCH:
            self._flush()
        return await done

    def _flush(self) -> None:
        if not self.queue:
            return
        batch, self.queue = self.queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, batch: list[tuple[list[str], str, asyncio.Future[Outcome]]]) -> None:
        keys = [k for group, _, _ in batch for k in group]
        arg = "\n".join(f"{len(group)}\t{spec}" for group, spec, _ in batch)
        try:  # bounded by the socket timeouts (no asyncio.timeout: it costs CPU on every call)
            raw = await self._run(keys, arg)
        except _FAILURES as exc:
            down = SharedStateDown(f"{type(exc).__name__}: {exc}")
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(down)
            return
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        for (_, _, done), part in zip(batch, text.split("\n"), strict=True):
            if not done.done():
                done.set_result(_decode(part))

    async def _run(self, keys: list[str], arg: str) -> bytes:
        """The script on the pipelined connection: by its hash, or whole when the server does not
        have it (a restarted server); once more on a fresh connection when the server closed the
        connection under it (never after a timeout: a hung server would stall the request twice)."""
        for attempt in (1, 2):
            try:
                try:
                    return await self.pipe.call("EVALSHA", _SHA, len(keys), *keys, arg)
                except ReplyError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    return await self.pipe.call("EVAL", APPLY, len(keys), *keys, arg)
            except Lost:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def ping(self) -> bool:
        """Whether the server answers; it also (re)loads the script, so that a burst of calls
        after a start or a restart does not load it once each."""
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await self.client.script_load(APPLY)
                return True
        except _FAILURES:
            return False

    async def publish(self, channel: str, message: str) -> None:
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await self.client.publish(self.key(channel), message)
        except _FAILURES as exc:
            raise SharedStateDown(f"{type(exc).__name__}: {exc}") from exc

    async def listen(self, channel: str) -> AsyncIterator[str]:
        """Subscribes (again after every failure, with a growing pause up to 5 s), yielding
        `RESYNC` each time it has."""
        backoff = ExponentialBackoff(cap=5.0, base=0.1)
        failures = 0
        while True:
            pubsub = self.listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.key(channel))
                failures = 0
                yield RESYNC
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        yield data.decode() if isinstance(data, bytes) else str(data)
            except _FAILURES:
                failures += 1
                await asyncio.sleep(backoff.compute(failures))
            finally:
                try:
                    await pubsub.aclose()
                except _FAILURES:
                    pass

    async def aclose(self) -> None:
        self.pipe.close()
        for client in (self.client, self.listener):
            try:
                await client.aclose()
            except _FAILURES:
                pass
