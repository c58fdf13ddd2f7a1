/*
 * Differential-test plugin in C against the raw Proxy-Wasm ABI 0.2.1: no SDK,
 * no libc (wasm32-unknown-unknown, -nostdlib). It uses the host functions
 * directly, serializes header maps by hand and writes to stdout/stderr through
 * WASI fd_write. The request header `x-test` picks the scenario; every HTTP
 * stream logs `end` from proxy_on_log (the harness's fence).
 */
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned long size_t;

#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))
#define WASI(name) __attribute__((import_module("wasi_snapshot_preview1"), import_name(#name)))
#define EXPORT(name) __attribute__((export_name(#name)))

IMPORT(proxy_log) u32 proxy_log(u32 level, const char *msg, size_t len);
IMPORT(proxy_get_log_level) u32 proxy_get_log_level(u32 *level);
IMPORT(proxy_get_current_time_nanoseconds) u32 proxy_get_current_time_nanoseconds(u64 *out);
IMPORT(proxy_get_buffer_bytes) u32 proxy_get_buffer_bytes(u32 t, u32 start, u32 max, char **ptr, size_t *len);
IMPORT(proxy_set_buffer_bytes) u32 proxy_set_buffer_bytes(u32 t, u32 start, u32 size, const char *ptr, size_t len);
IMPORT(proxy_get_buffer_status) u32 proxy_get_buffer_status(u32 t, size_t *len, u32 *flags);
IMPORT(proxy_get_header_map_pairs) u32 proxy_get_header_map_pairs(u32 t, char **ptr, size_t *len);
IMPORT(proxy_get_header_map_value) u32 proxy_get_header_map_value(u32 t, const char *k, size_t kl, char **v, size_t *vl);
IMPORT(proxy_add_header_map_value) u32 proxy_add_header_map_value(u32 t, const char *k, size_t kl, const char *v, size_t vl);
IMPORT(proxy_replace_header_map_value) u32 proxy_replace_header_map_value(u32 t, const char *k, size_t kl, const char *v, size_t vl);
IMPORT(proxy_remove_header_map_value) u32 proxy_remove_header_map_value(u32 t, const char *k, size_t kl);
IMPORT(proxy_get_header_map_size) u32 proxy_get_header_map_size(u32 t, size_t *size);
IMPORT(proxy_send_local_response) u32 proxy_send_local_response(u32 status, const char *d, size_t dl, const char *b, size_t bl, const char *h, size_t hl, i32 grpc);
IMPORT(proxy_get_property) u32 proxy_get_property(const char *p, size_t pl, char **v, size_t *vl);
IMPORT(proxy_get_shared_data) u32 proxy_get_shared_data(const char *k, size_t kl, char **v, size_t *vl, u32 *cas);
IMPORT(proxy_set_shared_data) u32 proxy_set_shared_data(const char *k, size_t kl, const char *v, size_t vl, u32 cas);
IMPORT(proxy_define_metric) u32 proxy_define_metric(u32 type, const char *n, size_t nl, u32 *id);
IMPORT(proxy_increment_metric) u32 proxy_increment_metric(u32 id, i64 delta);
IMPORT(proxy_get_metric) u32 proxy_get_metric(u32 id, u64 *value);
IMPORT(proxy_call_foreign_function) u32 proxy_call_foreign_function(const char *n, size_t nl, const char *a, size_t al, char **r, size_t *rl);

struct ciovec { const char *buf; size_t len; };
WASI(fd_write) u32 fd_write(u32 fd, const struct ciovec *iovs, size_t n, size_t *written);

enum { REQ_HEADERS = 0, RESP_HEADERS = 2, REQ_BODY = 0, PLUGIN_CONFIG = 7 };

/* ---- memory: a bump allocator over memory.grow; tests are short-lived ---- */
extern unsigned char __heap_base;
static unsigned long heap_top;

static void *alloc(size_t n) {
    if (!heap_top) heap_top = (unsigned long)&__heap_base;
    unsigned long p = (heap_top + 15) & ~15UL;
    unsigned long end = p + n;
    unsigned long have = __builtin_wasm_memory_size(0) * 65536UL;
    if (end > have) {
        unsigned long pages = (end - have + 65535) / 65536;
        if (__builtin_wasm_memory_grow(0, pages) == (unsigned long)-1) return 0;
    }
    heap_top = end;
    return (void *)p;
}

EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t n) { return alloc(n); }

/* ---- small string helpers ---- */
static size_t slen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static int eq(const char *a, size_t al, const char *b) { size_t bl = slen(b); if (al != bl) return 0; for (size_t i = 0; i < al; i++) if (a[i] != b[i]) return 0; return 1; }
static void copy(char *dst, const char *src, size_t n) { for (size_t i = 0; i < n; i++) dst[i] = src[i]; }

/* A growable text buffer on the bump heap. */
typedef struct { char *p; size_t len, cap; } buf;
static void put(buf *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = (b->cap + n) * 2 + 64;
        char *np = alloc(cap);
        if (b->len) copy(np, b->p, b->len);
        b->p = np; b->cap = cap;
    }
    copy(b->p + b->len, s, n); b->len += n;
}
static void puts_(buf *b, const char *s) { put(b, s, slen(s)); }
static void putu(buf *b, u64 v) {
    char tmp[24]; int i = 24;
    do { tmp[--i] = '0' + v % 10; v /= 10; } while (v);
    put(b, tmp + i, 24 - i);
}

static void logb(u32 level, buf *b) { proxy_log(level, b->p, b->len); }
static void logs(u32 level, const char *s) { proxy_log(level, s, slen(s)); }

/* Serializes pairs (k0, v0, k1, v1, ..., 0) the way the ABI reads maps. */
static buf map_of(const char **kv) {
    u32 n = 0; while (kv[2 * n]) n++;
    buf b = {0};
    put(&b, (const char *)&n, 4);
    for (u32 i = 0; i < n; i++) {
        u32 kl = slen(kv[2 * i]), vl = slen(kv[2 * i + 1]);
        put(&b, (const char *)&kl, 4); put(&b, (const char *)&vl, 4);
    }
    for (u32 i = 0; i < n; i++) { put(&b, kv[2 * i], slen(kv[2 * i]) + 1); put(&b, kv[2 * i + 1], slen(kv[2 * i + 1]) + 1); }
    return b;
}

static int header(u32 map, const char *name, char **v, size_t *vl) {
    return proxy_get_header_map_value(map, name, slen(name), v, vl) == 0;
}

static void reply(u32 status, const char *body, const char **kv) {
    buf h = map_of(kv);
    proxy_send_local_response(status, "c_raw", 5, body, slen(body), h.p, h.len, -1);
}

/* ---- per-stream state, keyed by context id ---- */
#define SLOTS 256
static char scenario[SLOTS][32];
static char *slot(u32 ctx) { return scenario[ctx % SLOTS]; }
static int is(u32 ctx, const char *s) { return eq(slot(ctx), slen(slot(ctx)), s); }

EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}
EXPORT(proxy_on_context_create) void proxy_on_context_create(u32 ctx, u32 parent) { slot(ctx)[0] = 0; (void)parent; }
EXPORT(proxy_on_vm_start) u32 proxy_on_vm_start(u32 root, size_t n) { (void)root; (void)n; return 1; }

EXPORT(proxy_on_configure) u32 proxy_on_configure(u32 root, size_t n) {
    char *cfg = 0; size_t len = 0;
    (void)root;
    if (n && proxy_get_buffer_bytes(PLUGIN_CONFIG, 0, n, &cfg, &len) != 0) return 0;
    buf b = {0}; puts_(&b, "c_raw configured: "); put(&b, cfg, len);
    logb(2, &b);
    return 1;
}

static void scenario_headers(void) {
    proxy_add_header_map_value(REQ_HEADERS, "x-c-added", 9, "1", 1);
    proxy_replace_header_map_value(REQ_HEADERS, "x-c-replace", 11, "replaced", 8);
    proxy_remove_header_map_value(REQ_HEADERS, "x-c-remove", 10);
    char *v; size_t vl;
    buf b = {0}; puts_(&b, "x-c-get=");
    if (header(REQ_HEADERS, "x-c-get", &v, &vl)) put(&b, v, vl); else puts_(&b, "<none>");
    logb(2, &b);
    /* Walk the serialized map and count our own headers (their order is the
     * host's business: the echo shows their values). */
    char *map; size_t ml;
    if (proxy_get_header_map_pairs(REQ_HEADERS, &map, &ml) != 0) return;
    u32 n = *(u32 *)map; u32 *lens = (u32 *)(map + 4); char *data = map + 4 + 8 * n;
    u32 ours = 0;
    for (u32 i = 0; i < n; i++) {
        u32 kl = lens[2 * i], vl2 = lens[2 * i + 1];
        if (kl > 4 && data[0] == 'x' && data[1] == '-' && data[2] == 'c' && data[3] == '-') ours++;
        data += kl + 1 + vl2 + 1;
    }
    size_t count = 0;
    proxy_get_header_map_size(REQ_HEADERS, &count);
    buf names = {0}; puts_(&names, "x-c headers: "); putu(&names, ours);
    puts_(&names, count > 0 ? " (map size known)" : " (no map size)");
    logb(2, &names);
}

static void scenario_props(void) {
    static const char *paths[][2] = {
        {"request\0path", "request.path"}, {"request\0method", "request.method"},
        {"request\0headers\0x-c-get", "request.headers.x-c-get"}, {"plugin_name", "plugin_name"},
    };
    static const size_t lens[] = {12, 14, 23, 11};
    for (int i = 0; i < 4; i++) {
        char *v; size_t vl;
        buf b = {0}; puts_(&b, "property "); puts_(&b, paths[i][1]); puts_(&b, "=");
        if (proxy_get_property(paths[i][0], lens[i], &v, &vl) == 0) put(&b, v, vl); else puts_(&b, "<none>");
        logb(2, &b);
    }
}

EXPORT(proxy_on_request_headers) u32 proxy_on_request_headers(u32 ctx, u32 n, u32 eos) {
    char *v; size_t vl;
    (void)n; (void)eos;
    if (!header(REQ_HEADERS, "x-test", &v, &vl)) return 0;
    if (vl > 31) vl = 31;
    copy(slot(ctx), v, vl); slot(ctx)[vl] = 0;
    if (is(ctx, "c-headers")) { scenario_headers(); return 0; }
    if (is(ctx, "c-props")) { scenario_props(); return 0; }
    if (is(ctx, "c-body")) {
        /* The body changes size: the length header would be stale. */
        proxy_remove_header_map_value(REQ_HEADERS, "content-length", 14);
        return 0;
    }
    if (is(ctx, "c-local")) {
        const char *kv[] = {"x-c-local", "1", "content-type", "text/plain", 0};
        reply(418, "teapot from c\n", kv);
        return 1;
    }
    if (is(ctx, "c-loglevel")) {
        u32 level = 99; proxy_get_log_level(&level);
        buf b = {0}; putu(&b, level); put(&b, "", 1);
        const char *kv[] = {"x-log-level", b.p, 0};
        reply(200, "loglevel\n", kv);
        return 1;
    }
    if (is(ctx, "c-fdwrite")) {
        struct ciovec out[2] = {{"to stdout ", 10}, {"from c\n", 7}};
        struct ciovec err[1] = {{"to stderr from c\n", 17}};
        size_t w1 = 0, w2 = 0;
        fd_write(1, out, 2, &w1);
        fd_write(2, err, 1, &w2);
        buf b = {0}; puts_(&b, "fd_write wrote "); putu(&b, w1); puts_(&b, " and "); putu(&b, w2);
        logb(2, &b);
        return 0;
    }
    if (is(ctx, "c-metrics")) {
        u32 id = 0; u64 value = 0;
        u32 s1 = proxy_define_metric(0, "c_raw_hits", 10, &id);
        u32 s2 = proxy_increment_metric(id, 3);
        u32 s3 = proxy_get_metric(id, &value);
        buf b = {0}; putu(&b, s1); puts_(&b, ","); putu(&b, s2); puts_(&b, ","); putu(&b, s3); put(&b, "", 1);
        buf c = {0}; putu(&c, value); put(&c, "", 1);
        const char *kv[] = {"x-status", b.p, "x-value", c.p, 0};
        reply(200, "metrics\n", kv);
        return 1;
    }
    if (is(ctx, "c-shared")) {
        char *val; size_t len; u32 cas = 0;
        u32 g = proxy_get_shared_data("c_raw.k", 7, &val, &len, &cas);
        u32 s1 = proxy_set_shared_data("c_raw.k", 7, "v1", 2, cas);
        u32 s2 = proxy_set_shared_data("c_raw.k", 7, "v2", 2, cas);
        buf b = {0}; putu(&b, g); puts_(&b, ","); putu(&b, s1); puts_(&b, ","); putu(&b, s2); put(&b, "", 1);
        const char *kv[] = {"x-statuses", b.p, 0};
        reply(200, "shared\n", kv);
        return 1;
    }
    if (is(ctx, "c-time")) {
        u64 now = 0; proxy_get_current_time_nanoseconds(&now);
        /* After 2020-01-01 and before 2100: a real wall clock in nanoseconds. */
        const char *ok = (now > 1577836800ULL * 1000000000ULL && now < 4102444800ULL * 1000000000ULL) ? "plausible" : "wrong";
        const char *kv[] = {"x-time", ok, 0};
        reply(200, "time\n", kv);
        return 1;
    }
    if (is(ctx, "c-ffi")) {
        char *r = 0; size_t rl = 0;
        u32 s = proxy_call_foreign_function("no_such_function", 16, "", 0, &r, &rl);
        buf b = {0}; putu(&b, s); put(&b, "", 1);
        const char *kv[] = {"x-ffi-status", b.p, 0};
        reply(200, "ffi\n", kv);
        return 1;
    }
    return 0;
}

EXPORT(proxy_on_request_body) u32 proxy_on_request_body(u32 ctx, size_t size, u32 eos) {
    if (!is(ctx, "c-body")) return 0;
    if (!eos) return 1;
    size_t len = 0; u32 flags = 0;
    proxy_get_buffer_status(REQ_BODY, &len, &flags);
    char *body = 0; size_t bl = 0;
    proxy_get_buffer_bytes(REQ_BODY, 0, size, &body, &bl);
    buf b = {0}; puts_(&b, "c body "); putu(&b, size); puts_(&b, " status len "); putu(&b, len); puts_(&b, ": "); put(&b, body, bl);
    logb(2, &b);
    buf nb = {0}; puts_(&nb, "c-replaced:"); put(&nb, body, bl);
    proxy_set_buffer_bytes(REQ_BODY, 0, size, nb.p, nb.len);
    return 0;
}

EXPORT(proxy_on_response_headers) u32 proxy_on_response_headers(u32 ctx, u32 n, u32 eos) {
    (void)n; (void)eos;
    if (is(ctx, "c-headers")) {
        proxy_add_header_map_value(RESP_HEADERS, "x-c-resp", 8, "added", 5);
        proxy_replace_header_map_value(RESP_HEADERS, "x-resp-replace", 14, "c", 1);
        proxy_remove_header_map_value(RESP_HEADERS, "x-resp-remove", 13);
    }
    if (is(ctx, "c-local")) {
        char *v; size_t vl;
        buf b = {0}; puts_(&b, "c-local response sees :status=");
        if (header(RESP_HEADERS, ":status", &v, &vl)) put(&b, v, vl);
        logb(2, &b);
    }
    return 0;
}

EXPORT(proxy_on_done) u32 proxy_on_done(u32 ctx) { (void)ctx; return 1; }
EXPORT(proxy_on_log) void proxy_on_log(u32 ctx) { (void)ctx; logs(2, "end"); }
EXPORT(proxy_on_delete) void proxy_on_delete(u32 ctx) { slot(ctx)[0] = 0; }
