#include "cuda_rt.h"

#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <mutex>

namespace warmstart::cuda {
namespace {

using Err = int;
using Stream = void*;
using Event = void*;

constexpr unsigned kHostAllocPortable = 1;
constexpr unsigned kHostRegisterPortable = 1;
constexpr unsigned kStreamNonBlocking = 1;
constexpr unsigned kEventBlockingSync = 1;  // the waiting thread sleeps instead of spinning
constexpr unsigned kEventDisableTiming = 2;
constexpr int kMemcpyHostToDevice = 1;
constexpr int kNotLoaded = -1;

struct Api {
  Err (*GetDeviceCount)(int*) = nullptr;
  Err (*GetDevice)(int*) = nullptr;
  Err (*SetDevice)(int) = nullptr;
  Err (*HostAlloc)(void**, size_t, unsigned) = nullptr;
  Err (*FreeHost)(void*) = nullptr;
  Err (*HostRegister)(void*, size_t, unsigned) = nullptr;
  Err (*HostUnregister)(void*) = nullptr;
  Err (*StreamCreateWithFlags)(Stream*, unsigned) = nullptr;
  Err (*StreamDestroy)(Stream) = nullptr;
  Err (*StreamSynchronize)(Stream) = nullptr;
  Err (*MemcpyAsync)(void*, const void*, size_t, int, Stream) = nullptr;
  Err (*EventCreateWithFlags)(Event*, unsigned) = nullptr;
  Err (*EventRecord)(Event, Stream) = nullptr;
  Err (*EventQuery)(Event) = nullptr;
  Err (*EventSynchronize)(Event) = nullptr;
  Err (*EventDestroy)(Event) = nullptr;
  Err (*StreamWaitEvent)(Stream, Event, unsigned) = nullptr;
  const char* (*GetErrorString)(Err) = nullptr;
};

Api api;
void* handle = nullptr;
// Set once the runtime resolved and answered, never cleared: the calls below check it
// without a lock while other threads may be in load(). `reason` is only touched under the
// mutex.
std::atomic<bool> ready{false};
std::string reason = "CUDA runtime not loaded yet";
std::string path;
std::mutex load_mutex;

template <typename F>
bool resolve(F& fn, const char* name) {
  fn = reinterpret_cast<F>(dlsym(handle, name));
  if (fn == nullptr) reason = std::string("CUDA runtime lacks ") + name;
  return fn != nullptr;
}

bool resolve_all() {
  return resolve(api.GetDeviceCount, "cudaGetDeviceCount") &&
         resolve(api.GetDevice, "cudaGetDevice") &&
         resolve(api.StreamWaitEvent, "cudaStreamWaitEvent") &&
         resolve(api.SetDevice, "cudaSetDevice") && resolve(api.HostAlloc, "cudaHostAlloc") &&
         resolve(api.FreeHost, "cudaFreeHost") &&
         resolve(api.HostRegister, "cudaHostRegister") &&
         resolve(api.HostUnregister, "cudaHostUnregister") &&
         resolve(api.StreamCreateWithFlags, "cudaStreamCreateWithFlags") &&
         resolve(api.StreamDestroy, "cudaStreamDestroy") &&
         resolve(api.StreamSynchronize, "cudaStreamSynchronize") &&
         resolve(api.MemcpyAsync, "cudaMemcpyAsync") &&
         resolve(api.EventCreateWithFlags, "cudaEventCreateWithFlags") &&
         resolve(api.EventRecord, "cudaEventRecord") &&
         resolve(api.EventQuery, "cudaEventQuery") &&
         resolve(api.EventSynchronize, "cudaEventSynchronize") &&
         resolve(api.EventDestroy, "cudaEventDestroy") &&
         resolve(api.GetErrorString, "cudaGetErrorString");
}

void* open_runtime(const std::vector<std::string>& mapped,
                   const std::vector<std::string>& paths, std::string* tried) {
  for (const std::string& so : mapped) {
    if (void* h = dlopen(so.c_str(), RTLD_NOW | RTLD_NOLOAD)) return h;
  }
  for (const std::string& p : paths) {
    if (void* h = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
    const char* e = dlerror();
    *tried += "\n  " + p + ": " + (e != nullptr ? e : "not found");
  }
  return nullptr;
}

std::string file_of(void* h) {
  link_map* map = nullptr;
  if (dlinfo(h, RTLD_DI_LINKMAP, &map) != 0 || map == nullptr || map->l_name == nullptr)
    return "";
  return map->l_name;
}

// Makes `device` current on the calling thread unless it already is (see cuda_rt.h).
Err use(int device) {
  int current = -1;
  if (api.GetDevice(&current) == 0 && current == device) return 0;
  return api.SetDevice(device);
}

}  // namespace

int load(const std::vector<std::string>& mapped, const std::vector<std::string>& paths) {
  std::lock_guard<std::mutex> lock(load_mutex);
  if (handle == nullptr) {
    std::string tried;
    handle = open_runtime(mapped, paths, &tried);
    if (handle == nullptr) {
      reason = "no CUDA runtime library (libcudart) could be loaded; tried:" + tried;
      return -1;
    }
    path = file_of(handle);
    if (!resolve_all()) {
      dlclose(handle);
      handle = nullptr;
      path.clear();
      api = Api{};
      return -1;
    }
  }
  int count = 0;
  Err err = api.GetDeviceCount(&count);
  if (err != 0) {
    if (!ready.load()) reason = std::string("cudaGetDeviceCount failed: ") + api.GetErrorString(err);
    return ready.load() ? 0 : -1;
  }
  reason.clear();
  ready.store(true);
  return count;
}

bool loaded() { return ready.load(); }

std::string loaded_path() {
  std::lock_guard<std::mutex> lock(load_mutex);
  return path;
}

std::string why() {
  std::lock_guard<std::mutex> lock(load_mutex);
  return reason;
}

const char* error_string(int code) {
  if (code == kNotLoaded) return "CUDA runtime not loaded";
  return api.GetErrorString != nullptr ? api.GetErrorString(code) : "unknown CUDA error";
}

int get_device(int* out) { return loaded() ? api.GetDevice(out) : kNotLoaded; }

int host_alloc(int device, uint64_t nbytes, void** out) {
  *out = nullptr;
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;  // else a fresh thread allocates through GPU 0
  Err e = api.HostAlloc(out, nbytes, kHostAllocPortable);
  if (e != 0) *out = nullptr;
  return e;
}

void host_free(int device, void* ptr) {
  if (loaded() && use(device) == 0) api.FreeHost(ptr);
}

int host_register(void* ptr, uint64_t nbytes) {
  return loaded() ? api.HostRegister(ptr, nbytes, kHostRegisterPortable) : kNotLoaded;
}

int host_unregister(void* ptr) { return loaded() ? api.HostUnregister(ptr) : kNotLoaded; }

int stream_create(int device, uintptr_t* out) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  Stream s = nullptr;
  Err e = api.StreamCreateWithFlags(&s, kStreamNonBlocking);
  *out = reinterpret_cast<uintptr_t>(s);
  return e;
}

int stream_destroy(int device, uintptr_t stream) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  return api.StreamDestroy(reinterpret_cast<Stream>(stream));
}

int stream_synchronize(int device, uintptr_t stream) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  return api.StreamSynchronize(reinterpret_cast<Stream>(stream));
}

int memcpy_h2d_async(int device, void* dst, const void* src, uint64_t n, uintptr_t stream) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  return api.MemcpyAsync(dst, src, n, kMemcpyHostToDevice, reinterpret_cast<Stream>(stream));
}

int event_create(int device, uintptr_t* out) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  Event ev = nullptr;
  Err e = api.EventCreateWithFlags(&ev, kEventDisableTiming | kEventBlockingSync);
  *out = reinterpret_cast<uintptr_t>(ev);
  return e;
}

int event_record(int device, uintptr_t event, uintptr_t stream) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  return api.EventRecord(reinterpret_cast<Event>(event), reinterpret_cast<Stream>(stream));
}

int event_query(int device, uintptr_t event) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  return api.EventQuery(reinterpret_cast<Event>(event));
}

int event_synchronize(int device, uintptr_t event) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  return api.EventSynchronize(reinterpret_cast<Event>(event));
}

int event_destroy(int device, uintptr_t event) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  return api.EventDestroy(reinterpret_cast<Event>(event));
}

int copy_and_wait(int device, void* dst, const void* src, uint64_t n, uintptr_t stream,
                  uintptr_t event) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  auto s = reinterpret_cast<Stream>(stream);
  auto ev = reinterpret_cast<Event>(event);
  if (Err e = api.MemcpyAsync(dst, src, n, kMemcpyHostToDevice, s)) return e;
  Err e = api.EventRecord(ev, s);
  if (e == 0) e = api.EventSynchronize(ev);
  if (e != 0) api.StreamSynchronize(s);  // the copy may still read `src`: wait for it
  return e;
}

int stream_wait_stream(int device, uintptr_t stream, uintptr_t other, uintptr_t event) {
  if (!loaded()) return kNotLoaded;
  if (Err e = use(device)) return e;
  auto ev = reinterpret_cast<Event>(event);
  if (Err e = api.EventRecord(ev, reinterpret_cast<Stream>(other))) return e;
  return api.StreamWaitEvent(reinterpret_cast<Stream>(stream), ev, 0);
}

}  // namespace warmstart::cuda
