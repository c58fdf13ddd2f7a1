// Differential-test plugin in Go (GOOS=wasip1, -buildmode=c-shared) against
// the raw Proxy-Wasm ABI 0.2.1, standard library only: host functions through
// //go:wasmimport, callbacks through //go:wasmexport. fmt writes to stdout and
// stderr, which the host turns into log lines (WASI fd_write). The request
// header `x-test` picks the scenario; every HTTP stream logs `end` from
// proxy_on_log (the harness's fence).
package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"unsafe"
)

func main() {}

//go:wasmimport env proxy_log
func proxyLog(level uint32, msg unsafe.Pointer, size uint32) uint32

//go:wasmimport env proxy_get_header_map_value
func proxyGetHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize unsafe.Pointer) uint32

//go:wasmimport env proxy_get_header_map_pairs
func proxyGetHeaderMapPairs(mapType uint32, ptr unsafe.Pointer, size unsafe.Pointer) uint32

//go:wasmimport env proxy_add_header_map_value
func proxyAddHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_replace_header_map_value
func proxyReplaceHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_remove_header_map_value
func proxyRemoveHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32) uint32

//go:wasmimport env proxy_get_buffer_bytes
func proxyGetBufferBytes(bufferType uint32, start uint32, max uint32, ptr unsafe.Pointer, size unsafe.Pointer) uint32

//go:wasmimport env proxy_send_local_response
func proxySendLocalResponse(status uint32, details unsafe.Pointer, detailsSize uint32, body unsafe.Pointer, bodySize uint32, headers unsafe.Pointer, headersSize uint32, grpcStatus int32) uint32

//go:wasmimport env proxy_get_shared_data
func proxyGetSharedData(key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize unsafe.Pointer, cas unsafe.Pointer) uint32

//go:wasmimport env proxy_set_shared_data
func proxySetSharedData(key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32, cas uint32) uint32

//go:wasmimport env proxy_register_shared_queue
func proxyRegisterSharedQueue(name unsafe.Pointer, nameSize uint32, id unsafe.Pointer) uint32

//go:wasmimport env proxy_resolve_shared_queue
func proxyResolveSharedQueue(vm unsafe.Pointer, vmSize uint32, name unsafe.Pointer, nameSize uint32, id unsafe.Pointer) uint32

//go:wasmimport env proxy_enqueue_shared_queue
func proxyEnqueueSharedQueue(id uint32, value unsafe.Pointer, size uint32) uint32

//go:wasmimport env proxy_dequeue_shared_queue
func proxyDequeueSharedQueue(id uint32, ptr unsafe.Pointer, size unsafe.Pointer) uint32

//go:wasmimport env proxy_set_tick_period_milliseconds
func proxySetTickPeriod(ms uint32) uint32

//go:wasmimport env proxy_get_log_level
func proxyGetLogLevel(level unsafe.Pointer) uint32

//go:wasmimport env proxy_get_property
func proxyGetProperty(path unsafe.Pointer, pathSize uint32, value unsafe.Pointer, valueSize unsafe.Pointer) uint32

//go:wasmimport env proxy_set_property
func proxySetProperty(path unsafe.Pointer, pathSize uint32, value unsafe.Pointer, valueSize uint32) uint32

const (
	mapRequestHeaders  = 0
	mapResponseHeaders = 2
	bufferPluginConfig = 7
	statusOK           = 0
	statusNotFound     = 1
	statusEmpty        = 7
)

// Host→guest copies land in buffers from proxy_on_memory_allocate; they stay
// referenced here until the guest has read them, so the GC keeps them.
var pinned = map[uintptr][]byte{}

//go:wasmexport proxy_on_memory_allocate
func proxyOnMemoryAllocate(size uint32) unsafe.Pointer {
	if size == 0 {
		size = 1
	}
	b := make([]byte, size)
	p := unsafe.Pointer(&b[0])
	pinned[uintptr(p)] = b
	return p
}

// take copies a host-returned buffer out and releases it.
func take(ptr unsafe.Pointer, size uint32) []byte {
	if ptr == nil {
		return nil
	}
	out := make([]byte, size)
	copy(out, unsafe.Slice((*byte)(ptr), size))
	delete(pinned, uintptr(ptr))
	return out
}

func bytesPtr(b []byte) unsafe.Pointer {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Pointer(&b[0])
}

func strPtr(s string) unsafe.Pointer { return bytesPtr([]byte(s)) }

func logAt(level uint32, msg string) { proxyLog(level, strPtr(msg), uint32(len(msg))) }

func getHeader(mapType uint32, name string) (string, bool) {
	var ptr unsafe.Pointer
	var size uint32
	if proxyGetHeaderMapValue(mapType, strPtr(name), uint32(len(name)), unsafe.Pointer(&ptr), unsafe.Pointer(&size)) != statusOK {
		return "", false
	}
	return string(take(ptr, size)), true
}

func addHeader(mapType uint32, k, v string) {
	proxyAddHeaderMapValue(mapType, strPtr(k), uint32(len(k)), strPtr(v), uint32(len(v)))
}

func replaceHeader(mapType uint32, k, v string) {
	proxyReplaceHeaderMapValue(mapType, strPtr(k), uint32(len(k)), strPtr(v), uint32(len(v)))
}

func removeHeader(mapType uint32, k string) {
	proxyRemoveHeaderMapValue(mapType, strPtr(k), uint32(len(k)))
}

func headerPairs(mapType uint32) [][2]string {
	var ptr unsafe.Pointer
	var size uint32
	if proxyGetHeaderMapPairs(mapType, unsafe.Pointer(&ptr), unsafe.Pointer(&size)) != statusOK {
		return nil
	}
	return decodeMap(take(ptr, size))
}

func decodeMap(b []byte) [][2]string {
	if len(b) < 4 {
		return nil
	}
	n := int(binary.LittleEndian.Uint32(b))
	data := 4 + 8*n
	out := make([][2]string, 0, n)
	for i := 0; i < n; i++ {
		kl := int(binary.LittleEndian.Uint32(b[4+8*i:]))
		vl := int(binary.LittleEndian.Uint32(b[8+8*i:]))
		k := string(b[data : data+kl])
		data += kl + 1
		v := string(b[data : data+vl])
		data += vl + 1
		out = append(out, [2]string{k, v})
	}
	return out
}

func encodeMap(pairs [][2]string) []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint32(b, uint32(len(pairs)))
	for _, p := range pairs {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p[0])))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p[1])))
	}
	for _, p := range pairs {
		b = append(append(b, p[0]...), 0)
		b = append(append(b, p[1]...), 0)
	}
	return b
}

func reply(status uint32, body string, headers [][2]string) uint32 {
	headers = append(headers, [2]string{"x-plugin", "go_raw"})
	h := encodeMap(headers)
	details := "go_raw"
	proxySendLocalResponse(status, strPtr(details), uint32(len(details)), strPtr(body), uint32(len(body)), bytesPtr(h), uint32(len(h)), -1)
	return 1
}

func sharedGet(key string) (string, uint32, uint32) {
	var ptr unsafe.Pointer
	var size, cas uint32
	s := proxyGetSharedData(strPtr(key), uint32(len(key)), unsafe.Pointer(&ptr), unsafe.Pointer(&size), unsafe.Pointer(&cas))
	if s != statusOK {
		return "", 0, s
	}
	return string(take(ptr, size)), cas, s
}

func sharedSet(key, value string, cas uint32) uint32 {
	return proxySetSharedData(strPtr(key), uint32(len(key)), strPtr(value), uint32(len(value)), cas)
}

// ---- root context ----

type config struct {
	queue  string
	tickMS uint32
}

var (
	rootConfig config
	queueID    uint32
	streams    = map[uint32]string{}
)

const ticksKey = "go_raw.ticks"
const queueKey = "go_raw.queue_last"

//go:wasmexport proxy_abi_version_0_2_1
func proxyAbiVersion() {}

//go:wasmexport proxy_on_context_create
func proxyOnContextCreate(ctx, parent uint32) {
	if parent != 0 {
		streams[ctx] = ""
	}
}

//go:wasmexport proxy_on_vm_start
func proxyOnVMStart(root, size uint32) uint32 { return 1 }

//go:wasmexport proxy_on_configure
func proxyOnConfigure(root, size uint32) uint32 {
	var ptr unsafe.Pointer
	var n uint32
	raw := ""
	if size > 0 && proxyGetBufferBytes(bufferPluginConfig, 0, size, unsafe.Pointer(&ptr), unsafe.Pointer(&n)) == statusOK {
		raw = string(take(ptr, n))
	}
	// The configuration is "key=value;key=value": this plugin has no JSON
	// parser on purpose (standard library only, and small).
	rootConfig = config{}
	for _, kv := range strings.Split(strings.Trim(raw, "\"{} "), ",") {
		k, v, _ := strings.Cut(kv, ":")
		k, v = strings.Trim(k, "\" "), strings.Trim(v, "\" ")
		switch k {
		case "queue":
			rootConfig.queue = v
		case "tick_ms":
			ms, _ := strconv.Atoi(v)
			rootConfig.tickMS = uint32(ms)
		}
	}
	if rootConfig.queue != "" {
		proxyRegisterSharedQueue(strPtr(rootConfig.queue), uint32(len(rootConfig.queue)), unsafe.Pointer(&queueID))
	}
	if rootConfig.tickMS > 0 {
		proxySetTickPeriod(rootConfig.tickMS)
	}
	fmt.Printf("go_raw configured: queue=%q tick_ms=%d\n", rootConfig.queue, rootConfig.tickMS)
	return 1
}

//go:wasmexport proxy_on_tick
func proxyOnTick(root uint32) {
	for {
		v, cas, _ := sharedGet(ticksKey)
		n, _ := strconv.Atoi(v)
		if sharedSet(ticksKey, strconv.Itoa(n+1), cas) != 8 {
			return
		}
	}
}

//go:wasmexport proxy_on_queue_ready
func proxyOnQueueReady(root, id uint32) {
	for {
		var ptr unsafe.Pointer
		var size uint32
		if proxyDequeueSharedQueue(id, unsafe.Pointer(&ptr), unsafe.Pointer(&size)) != statusOK {
			return
		}
		sharedSet(queueKey, string(take(ptr, size)), 0)
	}
}

// ---- HTTP contexts ----

//go:wasmexport proxy_on_request_headers
func proxyOnRequestHeaders(ctx, n, eos uint32) uint32 {
	test, _ := getHeader(mapRequestHeaders, "x-test")
	streams[ctx] = test
	switch test {
	case "go-headers":
		addHeader(mapRequestHeaders, "x-go-added", "1")
		replaceHeader(mapRequestHeaders, "x-go-replace", "replaced")
		removeHeader(mapRequestHeaders, "x-go-remove")
		v, ok := getHeader(mapRequestHeaders, "x-go-get")
		logAt(2, fmt.Sprintf("x-go-get=%s found=%v", v, ok))
		var ours []string
		for _, p := range headerPairs(mapRequestHeaders) {
			if strings.HasPrefix(p[0], "x-go-") {
				ours = append(ours, p[0]+"="+p[1])
			}
		}
		sort.Strings(ours)
		logAt(2, "x-go headers: "+strings.Join(ours, ","))
	case "go-stdout":
		fmt.Println("a line on stdout from go")
		fmt.Fprintln(os.Stderr, "a line on stderr from go")
	case "go-stdout-pieces":
		fmt.Print("two lines ")
		fmt.Print("in pieces\nand a second\n")
	case "go-local":
		return reply(404, "not here (go)\n", [][2]string{{"x-go-local", "1"}})
	case "go-shared":
		key, _ := getHeader(mapRequestHeaders, "x-key")
		value, _ := getHeader(mapRequestHeaders, "x-value")
		before, cas, gs := sharedGet(key)
		s1 := sharedSet(key, value, cas)
		s2 := sharedSet(key, "stale", cas)
		return reply(200, "shared\n", [][2]string{
			{"x-before", before}, {"x-get-status", strconv.Itoa(int(gs))},
			{"x-set", strconv.Itoa(int(s1))}, {"x-stale-set", strconv.Itoa(int(s2))},
		})
	case "go-queue":
		value, _ := getHeader(mapRequestHeaders, "x-value")
		var resolved uint32
		vm := ""
		rs := proxyResolveSharedQueue(strPtr(vm), 0, strPtr(rootConfig.queue), uint32(len(rootConfig.queue)), unsafe.Pointer(&resolved))
		es := proxyEnqueueSharedQueue(queueID, strPtr(value), uint32(len(value)))
		return reply(200, "queued\n", [][2]string{
			{"x-resolve", strconv.Itoa(int(rs))}, {"x-same-id", strconv.FormatBool(resolved == queueID)},
			{"x-enqueue", strconv.Itoa(int(es))},
		})
	case "go-queue-read":
		v, _, _ := sharedGet(queueKey)
		return reply(200, "queue-read\n", [][2]string{{"x-queue-last", v}})
	case "go-tick":
		v, _, _ := sharedGet(ticksKey)
		n, _ := strconv.Atoi(v)
		return reply(200, "tick\n", [][2]string{{"x-ticked", strconv.FormatBool(n > 0)}})
	case "go-loglevel":
		var level uint32 = 99
		proxyGetLogLevel(unsafe.Pointer(&level))
		return reply(200, "loglevel\n", [][2]string{{"x-log-level", strconv.Itoa(int(level))}})
	case "go-props":
		path := "go_raw_mark"
		value := "go-marked"
		ss := proxySetProperty(strPtr(path), uint32(len(path)), strPtr(value), uint32(len(value)))
		var ptr unsafe.Pointer
		var size uint32
		gs := proxyGetProperty(strPtr(path), uint32(len(path)), unsafe.Pointer(&ptr), unsafe.Pointer(&size))
		got := string(take(ptr, size))
		logAt(2, fmt.Sprintf("set_property=%d get_property=%d value=%s", ss, gs, got))
		p2 := "request\x00method"
		ptr, size = nil, 0
		proxyGetProperty(strPtr(p2), uint32(len(p2)), unsafe.Pointer(&ptr), unsafe.Pointer(&size))
		logAt(2, "request.method="+string(take(ptr, size)))
	}
	return 0
}

//go:wasmexport proxy_on_response_headers
func proxyOnResponseHeaders(ctx, n, eos uint32) uint32 {
	switch streams[ctx] {
	case "go-headers":
		addHeader(mapResponseHeaders, "x-go-resp", "added")
	case "go-local":
		status, _ := getHeader(mapResponseHeaders, ":status")
		fmt.Printf("go-local response sees :status=%s\n", status)
	}
	return 0
}

//go:wasmexport proxy_on_done
func proxyOnDone(ctx uint32) uint32 { return 1 }

//go:wasmexport proxy_on_log
func proxyOnLog(ctx uint32) {
	if _, ok := streams[ctx]; ok {
		logAt(2, "end")
	}
}

//go:wasmexport proxy_on_delete
func proxyOnDelete(ctx uint32) { delete(streams, ctx) }
