#include "cuda_rt.h"

#include <dlfcn.h>

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
  const char* (*GetErrorString)(Err) = nullptr;
};

Api api;
void* handle = nullptr;
// Set once the runtime resolved and answered, never cleared: the calls below check it
// without a lock while other threads may be in load(). `reason` is only touched under the
// mutex.
std::atomic<bool> ready{false};
std::string reason = "CUDA runtime not loaded yet";
std::mutex load_mutex;

template <typename F>
bool resolve(F& fn, const char* name) {
  fn = reinterpret_cast<F>(dlsym(handle, name));
  if (fn == nullptr) reason = std::string("CUDA runtime lacks ") + name;
  return fn != nullptr;
}

bool resolve_all() {
  return resolve(api.GetDeviceCount, "cudaGetDeviceCount") &&
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

void* open_runtime(const std::string& extra_path) {
  static const char* sonames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                                  "libcudart.so"};
  for (const char* so : sonames) {  // a runtime torch already loaded is the one to share
    if (void* h = dlopen(so, RTLD_NOW | RTLD_NOLOAD)) return h;
  }
  if (!extra_path.empty()) {
    if (void* h = dlopen(extra_path.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
  }
  for (const char* so : sonames) {
    if (void* h = dlopen(so, RTLD_NOW | RTLD_LOCAL)) return h;
  }
  return nullptr;
}

}  // namespace

int load(const std::string& extra_path) {
  std::lock_guard<std::mutex> lock(load_mutex);
  if (handle == nullptr) {
    handle = open_runtime(extra_path);
    if (handle == nullptr) {
      reason = "no CUDA runtime library (libcudart) could be loaded";
      return -1;
    }
    if (!resolve_all()) {
      dlclose(handle);
      handle = nullptr;
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

std::string why() {
  std::lock_guard<std::mutex> lock(load_mutex);
  return reason;
}

const char* error_string(int code) {
  if (code == kNotLoaded) return "CUDA runtime not loaded";
  return api.GetErrorString != nullptr ? api.GetErrorString(code) : "unknown CUDA error";
}

int set_device(int device) { return loaded() ? api.SetDevice(device) : kNotLoaded; }

void* host_alloc(uint64_t nbytes) {
  void* ptr = nullptr;
  if (!loaded() || api.HostAlloc(&ptr, nbytes, kHostAllocPortable) != 0) return nullptr;
  return ptr;
}

void host_free(void* ptr) {
  if (loaded()) api.FreeHost(ptr);
}

int host_register(void* ptr, uint64_t nbytes) {
  return loaded() ? api.HostRegister(ptr, nbytes, kHostRegisterPortable) : kNotLoaded;
}

int host_unregister(void* ptr) { return loaded() ? api.HostUnregister(ptr) : kNotLoaded; }

int stream_create(int device, uintptr_t* out) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  Stream s = nullptr;
  Err e = api.StreamCreateWithFlags(&s, kStreamNonBlocking);
  *out = reinterpret_cast<uintptr_t>(s);
  return e;
}

int stream_destroy(int device, uintptr_t stream) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  return api.StreamDestroy(reinterpret_cast<Stream>(stream));
}

int stream_synchronize(int device, uintptr_t stream) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  return api.StreamSynchronize(reinterpret_cast<Stream>(stream));
}

int memcpy_h2d_async(int device, void* dst, const void* src, uint64_t n, uintptr_t stream) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  return api.MemcpyAsync(dst, src, n, kMemcpyHostToDevice, reinterpret_cast<Stream>(stream));
}

int event_create(int device, uintptr_t* out) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  Event ev = nullptr;
  Err e = api.EventCreateWithFlags(&ev, kEventDisableTiming | kEventBlockingSync);
  *out = reinterpret_cast<uintptr_t>(ev);
  return e;
}

int event_record(int device, uintptr_t event, uintptr_t stream) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  return api.EventRecord(reinterpret_cast<Event>(event), reinterpret_cast<Stream>(stream));
}

// Every call that touches a device object first makes its device current on the calling
// thread: a thread that never chose one would otherwise start a context on device 0.
int event_query(int device, uintptr_t event) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  return api.EventQuery(reinterpret_cast<Event>(event));
}

int event_synchronize(int device, uintptr_t event) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  return api.EventSynchronize(reinterpret_cast<Event>(event));
}

int event_destroy(int device, uintptr_t event) {
  if (!loaded()) return kNotLoaded;
  if (Err e = api.SetDevice(device)) return e;
  return api.EventDestroy(reinterpret_cast<Event>(event));
}

}  // namespace warmstart::cuda
