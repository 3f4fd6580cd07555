// The CUDA runtime, resolved at run time with dlopen so the same build runs without CUDA.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace warmstart::cuda {

// Loads the runtime once per process: first each of `mapped` if it is already in the process
// (RTLD_NOLOAD: the runtime torch loaded is the one to share streams with), then each of
// `paths` with a plain dlopen, in the order given (the order is Python's policy). Later calls
// reuse the loaded runtime. Returns the device count, or -1 with why() set.
int load(const std::vector<std::string>& mapped, const std::vector<std::string>& paths);
bool loaded();
std::string why();
std::string loaded_path();  // the file the runtime was loaded from; "" before

// Every call below returns a cudaError_t code (0 is success); error_string names it.
//
// Calls taking a device make it current on the calling thread first, and leave it so: they
// are meant for threads warmstart owns (the copy engine's), never a caller's thread, so a
// caller's current device never changes. (Restoring instead would not do: on a thread that
// never chose a device, cudaSetDevice back to 0 creates a context on GPU 0.)
const char* error_string(int code);
int get_device(int* out);
int host_alloc(int device, uint64_t nbytes, void** out);  // pinned, portable
void host_free(int device, void* ptr);
int host_register(void* ptr, uint64_t nbytes);
int host_unregister(void* ptr);
int stream_create(int device, uintptr_t* out);
int stream_destroy(int device, uintptr_t stream);
int stream_synchronize(int device, uintptr_t stream);
int memcpy_h2d_async(int device, void* dst, const void* src, uint64_t n, uintptr_t stream);
int event_create(int device, uintptr_t* out);  // blocking sync: waiters sleep, not spin
int event_record(int device, uintptr_t event, uintptr_t stream);
int event_query(int device, uintptr_t event);  // 0 done, 600 (cudaErrorNotReady) pending
int event_synchronize(int device, uintptr_t event);
int event_destroy(int device, uintptr_t event);

// Queues the copy on `stream`, records `event` after it and waits for that event: returns
// only once the copy no longer reads `src`, also when something failed after it was queued
// (then it waits for the whole stream).
int copy_and_wait(int device, void* dst, const void* src, uint64_t n, uintptr_t stream,
                  uintptr_t event);
// Makes later work on `stream` wait for everything queued on `other` so far (an event
// recorded on `other`, waited for on `stream`); the host does not wait.
int stream_wait_stream(int device, uintptr_t stream, uintptr_t other, uintptr_t event);

}  // namespace warmstart::cuda
