#!/usr/bin/env node
// tiermem-client: a command-line client for the tiermem router in Node.js.
//
// It is written from docs/protocol.md and the JSON Schema that
// `tiermem schema` prints. Sockets come from the `zeromq` package (v6),
// MessagePack from `@msgpack/msgpack`.
//
// store, get and forget send one JSON frame on a DEALER socket and print the
// reply frame unchanged, as one JSON line. subscribe decodes the MessagePack
// events on the PUB socket, tracks the next expected sequence number, and
// fills every gap with ReadLog requests (in MessagePack, so that 64-bit
// integers survive as BigInt), printing each event once, in order.

import { randomUUID } from "node:crypto";
import { setTimeout as delay } from "node:timers/promises";
import { parseArgs } from "node:util";

import { Decoder, Encoder } from "@msgpack/msgpack";
import { Dealer, Subscriber } from "zeromq";

const EXIT_ANSWERED = 0; // Ack, Value, NotFound; or subscribe stopped
const EXIT_REJECTED = 1; // the router replied Error, Conflict or Busy
const EXIT_USAGE = 2; // invalid command line
const EXIT_NO_REPLY = 3; // no reply, a reply that cannot be decoded, or a socket failure

// ReadLog accepts 1 to 5,000; the protocol's default is 1,000.
const READ_LOG_LIMIT = 1000n;
// Upper bound on one Busy back-off, whatever retry_after_ms the router sends.
const MAX_BUSY_WAIT_MS = 10_000;
const RETRYABLE_CODES = new Set(["unavailable", "internal"]);

const USAGE = `usage: tiermem-client [OPTIONS] store     LANE_ENDPOINT KEY VALUE_JSON
       tiermem-client [OPTIONS] get       LANE_ENDPOINT KEY
       tiermem-client [OPTIONS] forget    LANE_ENDPOINT KEY
       tiermem-client [OPTIONS] subscribe LANE_ENDPOINT PUB_ENDPOINT

Sends one request to a tiermem router lane (for example
tcp://127.0.0.1:7452) and prints the reply as one JSON line; subscribe
prints every logged event from --from on, one JSON line each, in order.
Put -- before a VALUE_JSON that starts with '-'.

options:
  -n, --namespace NS         namespace of the memory (server default: default)
  -i, --id ID                store, get, forget: request id, kept for every resend
                             (default: random)
      --importance FLOAT     store: importance from 0.0 to 1.0
  -t, --tag TAG              store: add a tag; repeat for more tags
      --ttl SECONDS          store: time to live in seconds
      --expected-version N   store, forget: write only if the key is at version N
      --from SEQ             subscribe: first sequence number to print (default 1)
      --count N              subscribe: exit after printing N events (default: run
                             until SIGINT or SIGTERM)
      --idle-ms MS           subscribe: read the log after MS milliseconds without
                             a PUB frame, 0 to never (default 1000)
      --timeout-ms MS        wait per attempt, in milliseconds (default 10000)
      --attempts N           send a request at most N times (default 5)
  -h, --help                 print this help

exit status: 0 answered (Ack, Value, NotFound) or subscribe stopped;
1 the router replied Error, Conflict or Busy; 2 invalid command line;
3 no reply after every attempt, a reply that cannot be decoded, or a
socket failure.
`;

class UsageError extends Error {}

class NoReplyError extends Error {}

const msgpackEncoder = new Encoder({ useBigInt64: true });
const msgpackDecoder = new Decoder({ useBigInt64: true });

const jsonCodec = {
  decode: (frame) => JSON.parse(frame.toString("utf8")),
};

const msgpackCodec = {
  decode: (frame) => msgpackDecoder.decode(frame),
};

function warn(message) {
  process.stderr.write(`tiermem-client: ${message}\n`);
}

function parseInteger(name, text, min, max) {
  if (!/^-?\d+$/.test(text)) {
    throw new UsageError(`invalid ${name} ${text}: expected an integer from ${min} to ${max}`);
  }
  const value = BigInt(text);
  if (value < BigInt(min) || value > BigInt(max)) {
    throw new UsageError(`invalid ${name} ${text}: expected an integer from ${min} to ${max}`);
  }
  return value;
}

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      namespace: { type: "string", short: "n" },
      id: { type: "string", short: "i" },
      tag: { type: "string", short: "t", multiple: true },
      importance: { type: "string" },
      ttl: { type: "string" },
      "expected-version": { type: "string" },
      from: { type: "string", default: "1" },
      count: { type: "string" },
      "idle-ms": { type: "string", default: "1000" },
      "timeout-ms": { type: "string", default: "10000" },
      attempts: { type: "string", default: "5" },
      help: { type: "boolean", short: "h" },
    },
  });
  const maxInt64 = 2n ** 63n - 1n;
  const options = {
    namespace: values.namespace,
    id: values.id,
    tags: values.tag,
    importance: undefined,
    ttl: values.ttl === undefined ? undefined : parseInteger("--ttl", values.ttl, 1, maxInt64),
    expectedVersion:
      values["expected-version"] === undefined
        ? undefined
        : parseInteger("--expected-version", values["expected-version"], 0, maxInt64),
    fromSeq: parseInteger("--from", values.from, 1, maxInt64),
    count: values.count === undefined ? 0n : parseInteger("--count", values.count, 1, maxInt64),
    idleMs: Number(parseInteger("--idle-ms", values["idle-ms"], 0, 2 ** 31 - 1)),
    timeoutMs: Number(parseInteger("--timeout-ms", values["timeout-ms"], 1, 2 ** 31 - 1)),
    attempts: Number(parseInteger("--attempts", values.attempts, 1, 1000)),
    help: values.help === true,
  };
  if (values.importance !== undefined) {
    options.importance = Number(values.importance);
    if (values.importance.trim() === "" || !Number.isFinite(options.importance)) {
      throw new UsageError(`invalid --importance ${values.importance}: expected a number`);
    }
  }
  return { options, positionals };
}

// Encode a decoded MessagePack value as JSON text. JSON.stringify cannot
// write a BigInt, and the decoder returns one for every 64-bit integer.
// NOTE: MessagePack floats with no fraction (1.0) come back from the decoder
// as plain numbers and are written as integers (1).
function toJson(value) {
  if (value === null || value === undefined) {
    return "null";
  }
  if (typeof value === "bigint") {
    return value.toString();
  }
  if (typeof value === "number" || typeof value === "boolean" || typeof value === "string") {
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) {
    return `[${value.map(toJson).join(",")}]`;
  }
  if (value instanceof Uint8Array) {
    throw new TypeError("MessagePack bin values have no JSON form");
  }
  const members = Object.entries(value).map(([key, item]) => `${JSON.stringify(key)}:${toJson(item)}`);
  return `{${members.join(",")}}`;
}

class Client {
  constructor(endpoint, options) {
    this.endpoint = endpoint;
    this.options = options;
    this.dealer = new Dealer({ linger: 0 });
    this.dealer.connect(endpoint);
    this.stopped = false;
  }

  newId() {
    return `node-${randomUUID()}`;
  }

  // Send `frame` and return the reply whose id is `requestId`, with its raw
  // frame. A request is resent with the same id after a timeout, after Busy
  // (once retry_after_ms has passed) and after an Error with code
  // `unavailable` or `internal`, following "Retrying safely" in
  // docs/protocol.md. When the reply to every attempt was Busy or a
  // retryable Error, that last reply is returned.
  async call(frame, requestId, codec) {
    let last = null;
    for (let attempt = 1; attempt <= this.options.attempts && !this.stopped; attempt++) {
      await this.dealer.send(frame);
      const deadline = Date.now() + this.options.timeoutMs;
      let resend = false;
      while (!resend && !this.stopped) {
        const remaining = deadline - Date.now();
        if (remaining <= 0) {
          warn(
            `no reply to ${requestId} from ${this.endpoint} within ${this.options.timeoutMs} ms ` +
              `(attempt ${attempt} of ${this.options.attempts})`,
          );
          break;
        }
        this.dealer.receiveTimeout = remaining;
        let frames;
        try {
          frames = await this.dealer.receive();
        } catch (error) {
          if (error.code === "EAGAIN") {
            continue;
          }
          if (this.stopped) {
            return last;
          }
          throw error;
        }
        const payload = frames[frames.length - 1];
        let reply;
        try {
          reply = codec.decode(payload);
        } catch (error) {
          // With one request in flight this is most likely its reply, so
          // waiting for another would only end in a timeout.
          throw new NoReplyError(`cannot decode the reply from ${this.endpoint}: ${error.message}`);
        }
        // This client has one request in flight, so a reply with another id
        // is a late reply to an earlier request, and an Error without an id
        // is the reply to this one, whose id the router could not read.
        const unreadableId = reply.id === null && reply.type === "Error";
        if (!unreadableId && reply.id !== requestId) {
          continue;
        }
        last = { reply, payload };
        if (reply.type === "Busy") {
          const wait = Math.min(Math.max(Number(reply.retry_after_ms) || 1, 1), MAX_BUSY_WAIT_MS);
          warn(`${this.endpoint} is busy; resending ${requestId} in ${wait} ms`);
          await delay(wait);
          resend = true;
        } else if (reply.type === "Error" && RETRYABLE_CODES.has(reply.code)) {
          warn(`${this.endpoint} replied ${reply.code} to ${requestId}; resending`);
          resend = true;
        } else {
          return last;
        }
      }
    }
    if (last === null && !this.stopped) {
      throw new NoReplyError(`no reply from ${this.endpoint} after ${this.options.attempts} attempts`);
    }
    return last;
  }

  // Build a JSON request whose `value` is the caller's JSON text, unchanged,
  // so that numbers JavaScript cannot represent exactly (integers above 2^53) are
  // sent as written.
  async sendJson(fields, valueText) {
    const requestId = fields.id ?? this.newId();
    const members = Object.entries({ ...fields, id: requestId })
      .filter(([, item]) => item !== undefined)
      .map(([key, item]) => `${JSON.stringify(key)}:${typeof item === "bigint" ? item.toString() : JSON.stringify(item)}`);
    if (valueText !== undefined) {
      members.push(`"value":${valueText}`);
    }
    return this.call(Buffer.from(`{${members.join(",")}}`, "utf8"), requestId, jsonCodec);
  }

  close() {
    this.stopped = true;
    if (!this.dealer.closed) {
      this.dealer.close();
    }
  }
}

function printReply(answer) {
  if (answer === null) {
    warn("no reply");
    return EXIT_NO_REPLY;
  }
  process.stdout.write(`${answer.payload.toString("utf8")}\n`);
  const answered = ["Ack", "Value", "NotFound"].includes(answer.reply.type);
  return answered ? EXIT_ANSWERED : EXIT_REJECTED;
}

function envelope(type, version, options) {
  // `v` is sent explicitly: an omitted `v` means the server's current
  // version, which can change under a client after a server upgrade.
  return { type, id: options.id, v: version, namespace: options.namespace };
}

async function runStore(client, key, valueText) {
  try {
    JSON.parse(valueText);
  } catch (error) {
    throw new UsageError(`VALUE_JSON is not valid JSON: ${error.message}`);
  }
  const { options } = client;
  const fields = {
    ...envelope("Store", 2, options),
    key,
    importance: options.importance,
    tags: options.tags,
    ttl_s: options.ttl,
    expected_version: options.expectedVersion,
  };
  return printReply(await client.sendJson(fields, valueText));
}

async function runKeyRequest(client, type, key) {
  const { options } = client;
  const fields = { ...envelope(type, 1, options), key };
  if (type === "Forget") {
    fields.expected_version = options.expectedVersion;
  }
  return printReply(await client.sendJson(fields));
}

class ProtocolFailure extends Error {}

// A subscriber that prints every logged event from --from on, in order, each once.
class Subscription {
  constructor(client, pubEndpoint) {
    this.client = client;
    this.options = client.options;
    this.pubEndpoint = pubEndpoint;
    this.nextSeq = this.options.fromSeq;
    this.printed = 0n;
    this.pubMessages = 0n;
    this.sub = new Subscriber({ linger: 0 });
    // Every topic: a filter would hide other events' sequence numbers, and a
    // gap could not be distinguished from a filtered event.
    this.sub.subscribe();
    this.sub.connect(pubEndpoint);
  }

  done() {
    return this.client.stopped || (this.options.count > 0n && this.printed >= this.options.count);
  }

  print(event) {
    const seq = BigInt(event.seq);
    if (seq < this.nextSeq) {
      return;
    }
    if (seq > this.nextSeq) {
      warn(`events ${this.nextSeq} to ${seq - 1n} are no longer in the log; continuing at ${seq}`);
    }
    process.stdout.write(`${toJson(event)}\n`);
    this.nextSeq = seq + 1n;
    this.printed += 1n;
  }

  // Print logged events from nextSeq on, up to `untilSeq` (exclusive) or
  // until the log has no more.
  async readLog(untilSeq = null) {
    while (!this.done()) {
      let limit = READ_LOG_LIMIT;
      if (untilSeq !== null) {
        limit = untilSeq - this.nextSeq < limit ? untilSeq - this.nextSeq : limit;
        if (limit <= 0n) {
          return;
        }
      }
      const requestId = this.client.newId();
      const request = { type: "ReadLog", id: requestId, from_seq: this.nextSeq, limit };
      const answer = await this.client.call(msgpackEncoder.encode(request), requestId, msgpackCodec);
      if (answer === null) {
        return;
      }
      if (answer.reply.type !== "LogEvents") {
        throw new ProtocolFailure(`ReadLog from ${this.nextSeq} failed: ${toJson(answer.reply)}`);
      }
      const { events } = answer.reply;
      for (const event of events) {
        if (this.done()) {
          return;
        }
        this.print(event);
      }
      if (events.length === 0 || this.nextSeq > BigInt(answer.reply.last_seq)) {
        return;
      }
    }
  }

  // Receive PUB frames; return one [topic, event] message, or null after
  // the idle timeout.
  async receive() {
    this.sub.receiveTimeout = this.options.idleMs > 0 ? this.options.idleMs : -1;
    try {
      return await this.sub.receive();
    } catch (error) {
      if (error.code === "EAGAIN" || this.client.stopped) {
        return null;
      }
      throw error;
    }
  }

  // The SUB socket subscribes before the first ReadLog, so the events logged
  // after that read reach this subscriber on PUB, unless ZeroMQ drops them
  // (a subscription that is not active yet, or the high-water mark). A
  // frame whose seq is past nextSeq shows such a gap, and the idle poll
  // catches up when no frame follows.
  async run() {
    await this.readLog();
    while (!this.done()) {
      const message = await this.receive();
      if (this.done()) {
        break;
      }
      if (message === null) {
        await this.readLog();
        continue;
      }
      this.pubMessages += 1n;
      if (message.length !== 2) {
        warn(`ignoring a PUB message of ${message.length} frames; expected topic and event`);
        continue;
      }
      let event;
      try {
        event = msgpackDecoder.decode(message[1]);
      } catch (error) {
        // ReadLog returns the same event. If it cannot be decoded there
        // either, call() raises and the subscriber exits with status 3.
        warn(`cannot decode a PUB event (${error.message}); reading the log instead`);
        await this.readLog();
        continue;
      }
      const seq = BigInt(event.seq);
      if (seq > this.nextSeq) {
        warn(`missed events ${this.nextSeq} to ${seq - 1n} on PUB; reading them from the log`);
        await this.readLog(seq);
      }
      if (!this.done()) {
        this.print(event);
      }
    }
  }

  close() {
    if (!this.sub.closed) {
      this.sub.close();
    }
  }
}

async function runCommand(client, command, args) {
  if (command === "store" && args.length === 2) {
    return runStore(client, args[0], args[1]);
  }
  if (command === "get" && args.length === 1) {
    return runKeyRequest(client, "Get", args[0]);
  }
  if (command === "forget" && args.length === 1) {
    return runKeyRequest(client, "Forget", args[0]);
  }
  if (command === "subscribe" && args.length === 1) {
    const subscription = new Subscription(client, args[0]);
    // Closing the sockets ends a pending receive, so run() returns.
    const stop = () => {
      client.close();
      subscription.close();
    };
    process.once("SIGINT", stop);
    process.once("SIGTERM", stop);
    try {
      await subscription.run();
    } finally {
      subscription.close();
      warn(`subscribe printed ${subscription.printed} events and received ${subscription.pubMessages} PUB messages`);
    }
    return EXIT_ANSWERED;
  }
  throw new UsageError(`unknown command or wrong number of arguments: ${command ?? "(none)"}`);
}

async function main(argv) {
  let parsed;
  try {
    parsed = parseCommandLine(argv);
  } catch (error) {
    warn(error.message);
    process.stderr.write(USAGE);
    return EXIT_USAGE;
  }
  const { options, positionals } = parsed;
  if (options.help) {
    process.stdout.write(USAGE);
    return EXIT_ANSWERED;
  }
  if (positionals.length < 2) {
    process.stderr.write(USAGE);
    return EXIT_USAGE;
  }
  const [command, endpoint, ...args] = positionals;
  let client;
  try {
    client = new Client(endpoint, options);
  } catch (error) {
    warn(`invalid lane endpoint ${endpoint}: ${error.message}`);
    return EXIT_USAGE;
  }
  try {
    return await runCommand(client, command, args);
  } catch (error) {
    if (error instanceof UsageError) {
      warn(error.message);
      process.stderr.write(USAGE);
      return EXIT_USAGE;
    }
    if (error instanceof ProtocolFailure) {
      warn(error.message);
      return EXIT_REJECTED;
    }
    warn(error.message);
    return EXIT_NO_REPLY;
  } finally {
    client.close();
  }
}

process.exitCode = await main(process.argv.slice(2));
