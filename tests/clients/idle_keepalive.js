// An idle @grpc/grpc-js channel pinging every KEEPALIVE_MS (permitted without calls):
// prints "ok" if it stays READY for WATCH_MS, else the state it fell to (GOAWAY → IDLE).
// Usage: node idle_keepalive.js <host:port> <keepalive_ms> <watch_ms>
const grpc = require("@grpc/grpc-js");

const [target, keepaliveMs, watchMs] = process.argv.slice(2);
const channel = new grpc.Channel(target, grpc.credentials.createInsecure(), {
  "grpc.keepalive_time_ms": Number(keepaliveMs),
  "grpc.keepalive_timeout_ms": 5000,
  "grpc.keepalive_permit_without_calls": 1,
});
const { READY } = grpc.connectivityState;
const end = Date.now() + Number(watchMs);

function watch(state) {
  if (Date.now() >= end) {
    console.log(state === READY ? "ok" : `state ${state}`);
    process.exit(0);
  }
  channel.watchConnectivityState(state, Math.min(end, Date.now() + 1000), (err) => {
    const next = channel.getConnectivityState(true);
    if (!err && state === READY && next !== READY) {
      console.log(`left READY for ${grpc.connectivityState[next]}`);
      process.exit(1);
    }
    watch(next);
  });
}

// Connect first (getConnectivityState(true) starts it), then watch from READY.
(function connect(deadline) {
  const state = channel.getConnectivityState(true);
  if (state === READY) return watch(READY);
  if (Date.now() > deadline) {
    console.log(`never READY (${grpc.connectivityState[state]})`);
    process.exit(2);
  }
  channel.watchConnectivityState(state, Date.now() + 1000, () => connect(deadline));
})(Date.now() + 10000);
