// A worker in another language: Node with @grpc/grpc-js and @grpc/proto-loader, loading
// only protos/aiwfe/taskproc/v1/worker_service.proto. It polls, heartbeats and completes
// `count` tasks of type "upper" (output {text: upper-cased input.text, worker: "node"}),
// printing one JSON line per task, then exits 0.
// Usage: node task_worker.js <gateway host:port> <bearer> <queue> <count>
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, bearer, queue, count] = process.argv.slice(2);
const protos = path.resolve(__dirname, "../../protos");
const definition = protoLoader.loadSync("aiwfe/taskproc/v1/worker_service.proto", {
  includeDirs: [protos],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { WorkerService } = grpc.loadPackageDefinition(definition).aiwfe.taskproc.v1;
const client = new WorkerService(target, grpc.credentials.createInsecure());

// google.protobuf.Value/Struct in proto-loader's object form <-> plain JSON.
function fromValue(v) {
  switch (v && v.kind) {
    case "structValue": return fromStruct(v.structValue);
    case "listValue": return v.listValue.values.map(fromValue);
    case "numberValue": return v.numberValue;
    case "stringValue": return v.stringValue;
    case "boolValue": return v.boolValue;
    default: return null;
  }
}
function fromStruct(s) {
  return Object.fromEntries(Object.entries(s.fields || {}).map(([k, v]) => [k, fromValue(v)]));
}
function toValue(x) {
  if (x === null || x === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof x === "number") return { numberValue: x };
  if (typeof x === "string") return { stringValue: x };
  if (typeof x === "boolean") return { boolValue: x };
  if (Array.isArray(x)) return { listValue: { values: x.map(toValue) } };
  return { structValue: toStruct(x) };
}
function toStruct(o) {
  return { fields: Object.fromEntries(Object.entries(o).map(([k, v]) => [k, toValue(v)])) };
}

function call(method, request, seconds) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${bearer}`);
  const deadline = Date.now() + seconds * 1000;
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

async function main() {
  let done = 0;
  while (done < Number(count)) {
    const task = await call("PollTask", { queues: [queue], types: ["upper"], wait_seconds: 5, worker_identity: "node" }, 15);
    if (!task.task_token) continue;
    const input = fromValue(task.input);
    const beat = await call("HeartbeatTask", { task_token: task.task_token, queue: task.queue, details: toStruct({ stage: "upper" }) }, 5);
    await call("CompleteTask", {
      task_token: task.task_token,
      queue: task.queue,
      output: toStruct({ text: String(input.text).toUpperCase(), worker: "node" }),
    }, 5);
    console.log(JSON.stringify({
      workflow_id: task.workflow_id, step: task.step_name, type: task.type, attempt: task.attempt,
      heartbeat_timeout_seconds: task.heartbeat_timeout_seconds, cancel_requested: beat.cancel_requested,
      traceparent: task.traceparent, task_token: task.task_token,
    }));
    done += 1;
  }
  client.close();
}

main().catch((err) => {
  console.error(`${err.code} ${err.details || err.message}`);
  process.exit(1);
});
