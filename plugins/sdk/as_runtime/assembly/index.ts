// Differential-test plugin in AssemblyScript on @solo-io/proxy-runtime
// (ABI 0.2.0, root id "as_runtime"). The request header `x-test` picks the
// scenario; every HTTP stream logs `end` from onLog (the harness's fence).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, FilterDataStatusValues,
  stream_context, Headers, HeaderPair, send_local_response, GrpcStatusValues, LogLevelValues, log,
  Counter,
} from "@solo-io/proxy-runtime";
import { get_property, set_property, get_buffer_bytes, BufferTypeValues, WasmResultValues } from "@solo-io/proxy-runtime/runtime";

function info(msg: string): void { log(LogLevelValues.info, msg); }

// The configuration is JSON ({"upstream": "..."}); the runtime has no JSON
// parser, so take the quoted value after the key.
function upstreamOf(config: string): string {
  const key = "\"upstream\":\"";
  const at = config.indexOf(key);
  if (at < 0) return "";
  const start = at + key.length;
  return config.substring(start, config.indexOf("\"", start));
}

function header(k: string, v: string): HeaderPair {
  return new HeaderPair(String.UTF8.encode(k), String.UTF8.encode(v));
}

class AsRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new AsStream(context_id, this);
  }
  onConfigure(configuration_size: u32): bool {
    super.onConfigure(configuration_size);
    info("as_runtime configured: " + this.getConfiguration());
    return true;
  }
}

class AsStream extends Context {
  test: string = "";
  root: AsRoot;
  constructor(context_id: u32, root_context: AsRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }

  reply(status: u32, body: string, extra: Headers): FilterHeadersStatusValues {
    extra.push(header("x-plugin", "as_runtime"));
    send_local_response(status, "as_runtime", String.UTF8.encode(body), extra, GrpcStatusValues.Ok);
    return FilterHeadersStatusValues.StopIteration;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    this.test = stream_context.headers.request.get("x-test");
    if (this.test == "as-headers") {
      stream_context.headers.request.add("x-as-added", "1");
      stream_context.headers.request.replace("x-as-replace", "replaced");
      stream_context.headers.request.remove("x-as-remove");
      info("x-as-get=" + stream_context.headers.request.get("x-as-get"));
      return FilterHeadersStatusValues.Continue;
    }
    if (this.test == "as-local") {
      let h: Headers = [];
      h.push(header("x-as-local", "1"));
      return this.reply(429, "slow down from as\n", h);
    }
    if (this.test == "as-config") {
      return this.reply(200, this.root.getConfiguration(), []);
    }
    if (this.test == "as-props") {
      info("property request.path=" + String.UTF8.decode(get_property("request\0path")));
      info("property plugin_root_id=" + String.UTF8.decode(get_property("plugin_root_id")));
      const set = set_property("as_runtime_mark", String.UTF8.encode("marked"));
      info("set_property status " + set.toString());
      return FilterHeadersStatusValues.Continue;
    }
    if (this.test == "as-metrics") {
      const c = new Counter("as_runtime_requests");
      // The runtime's get_metric calls proxy_record_metric (an SDK bug), so only
      // the increment's status is observable from here.
      const r = c.increment(2);
      let h: Headers = [];
      h.push(header("x-as-increment", r.toString()));
      return this.reply(200, "metrics\n", h);
    }
    if (this.test == "as-httpcall") {
      let h: Headers = [];
      h.push(header(":method", "GET"));
      h.push(header(":path", "/as-callout"));
      h.push(header(":authority", "echo.default.svc.cluster.local"));
      const r = this.root.httpCall(upstreamOf(this.root.getConfiguration()), h, new ArrayBuffer(0), [], 5000, this,
        (origin: Context, headers: u32, body_size: usize, trailers: u32): void => {
          const status = stream_context.headers.http_callback.get(":status");
          const body = get_buffer_bytes(BufferTypeValues.HttpCallResponseBody, 0, body_size as u32);
          info("as http_call response status=" + status + " body bytes " + body.byteLength.toString());
          stream_context.headers.request.add("x-as-callout-status", status);
          origin.continueRequest();
        });
      if (r != WasmResultValues.Ok) {
        return this.reply(500, "http_call failed " + r.toString() + "\n", []);
      }
      return FilterHeadersStatusValues.StopIteration;
    }
    return FilterHeadersStatusValues.Continue;
  }

  onRequestBody(body_buffer_length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (this.test != "as-body") return FilterDataStatusValues.Continue;
    if (!end_of_stream) return FilterDataStatusValues.StopIterationAndBuffer;
    const body = get_buffer_bytes(BufferTypeValues.HttpRequestBody, 0, body_buffer_length as u32);
    info("as body: " + String.UTF8.decode(body));
    return FilterDataStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    if (this.test == "as-headers") {
      stream_context.headers.response.add("x-as-resp", "added");
    }
    if (this.test == "as-local") {
      info("as-local response sees :status=" + stream_context.headers.response.get(":status"));
    }
    return FilterHeadersStatusValues.Continue;
  }

  onLog(): void {
    info("end");
  }
}

registerRootContext((context_id: u32): RootContext => { return new AsRoot(context_id); }, "as_runtime");
