// edgeadapt's ExecuTorch runner: loads a program and runs its methods with a plain C ABI, so
// Python calls it through ctypes, which releases the GIL for the call (ExecuTorch's Python
// runtime holds it for a whole Method::execute, so a switch waited for every decode step).
//
// It does what the pybindings' Program / Method do (extension/pybindings/pybindings.cpp), no
// more: one set of planned arenas per program, each sized to the largest any method asks for,
// shared by every method (so methods exported with share_mutable_buffers=True read one copy of
// the shared mutable buffers: the live weights, the KV cache); one loaded Method per name;
// tensor inputs set with Method::set_input (copied into planned inputs, aliased otherwise);
// storage for outputs the program does not plan; outputs copied out once, after each run.
//
// Registers nothing: kernels and backends come from ExecuTorch's registries in
// libexecutorch.so, filled by the libraries loaded before (the executorch pybindings load
// XNNPACK and the optimized kernels, edgeadapt's own kernel library registers
// edgeadapt::live_linear.out).
//
// Threads: runs of one program share its arenas, so they take the program's mutex; runs of
// different programs go on in parallel. A run steps through its instructions (Method::step,
// what Method::execute loops over) so that et_runner_hold can pause it between two of them: a
// switch that writes the live weights under a run (whose result it voids) holds the program,
// so the run in flight stops at its next instruction instead of sharing the cores with the
// write, and goes on (to be discarded and redone by its caller) once the hold is released.
// ExecuTorch cannot abandon a run part way (Method::reset_execution refuses before its end).
// A run is batch-scheduled (SCHED_BATCH, struct Batch), so the held run a switch releases does
// not take the switch's core from it on waking.
// A run's outputs stay in the program's memory, its mutex held by the calling thread, until the
// caller, having read their shapes (et_runner_output) and allocated its arrays, copies them with
// et_runner_take_outputs (or drops them, et_runner_release_outputs), which releases the mutex:
// one copy, as the pybindings make (a copy into storage of the thread first cost a forward of
// 8 x 64 tokens, 100 MB of logits, 12-17% against the pybindings on the same program).
// Errors: a call returns -1 (or NULL) and et_runner_error() says why, for the calling thread.
//
// Built and loaded by edgeadapt/runtime/backends/executorch/native_runner.py.

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/data_loader/mmap_data_loader.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

#include <algorithm>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <cinttypes>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::extension::BufferDataLoader;
using executorch::extension::MallocMemoryAllocator;
using executorch::extension::MmapDataLoader;
using executorch::runtime::DataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::MethodMeta;
using executorch::runtime::Program;
using executorch::runtime::Result;
using executorch::runtime::Span;

namespace {

constexpr int MAX_DIM = 16;  // dimensions of a tensor crossing the C ABI

thread_local std::string last_error;

int fail(const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  last_error = buf;
  return -1;
}

// the calling thread's last run, its outputs not yet taken: the program's mutex, held
struct Pending {
  std::unique_lock<std::mutex> lock;
  std::vector<EValue> values;  // tensors in the program's memory, valid while lock is held
  void release() {
    values.clear();
    lock = std::unique_lock<std::mutex>();  // unlocks the mutex where it is held
  }
};

thread_local Pending pending;

struct Runner {
  std::vector<uint8_t> blob;  // the program's bytes, when loaded from memory
  std::unique_ptr<DataLoader> loader;
  std::unique_ptr<Program> program;
  std::vector<std::vector<uint8_t>> arenas;
  std::vector<Span<uint8_t>> spans;
  std::unique_ptr<HierarchicalAllocator> planned;
  MallocMemoryAllocator method_allocator;
  MallocMemoryAllocator temp_allocator;
  std::unique_ptr<MemoryManager> memory;
  // declared last: destroyed before the memory and the program they use
  std::vector<std::string> names;
  std::vector<std::unique_ptr<Method>> methods;
  std::vector<std::vector<std::vector<uint8_t>>> output_storage;  // per method: unplanned outputs
  std::mutex mutex;
  // et_runner_hold: runs pause between instructions while holds > 0
  std::atomic<int> holds{0};
  std::mutex hold_mutex;
  std::condition_variable released;
  std::string broken;  // set when a step failed part way: the method cannot be reset
};

// Method::execute, one instruction at a time, pausing while the program is held. As execute()
// does, the temporary allocator is reset first; a failed step leaves the method part way
// (ExecuTorch resets only a run that reached its end), so the program is marked broken.
// The calling thread batch-scheduled for the run (Linux SCHED_BATCH: no privilege needed; its
// own policy back after). A switch that releases a held run wakes it; a normal thread woken so
// preempts the waker (the run's threads then fill both cores of a 2-core device, and the switch
// returns a time slice later), where a batch thread waits for a free core.
struct Batch {
  int policy = -1;
  sched_param param{};
#if defined(SCHED_BATCH)  // elsewhere: nothing
  Batch() {
    if (pthread_getschedparam(pthread_self(), &policy, &param) != 0 || policy != SCHED_OTHER) {
      policy = -1;  // another policy (real time, batch already): left as it is
      return;
    }
    sched_param batch{};
    if (pthread_setschedparam(pthread_self(), SCHED_BATCH, &batch) != 0) policy = -1;
  }
  ~Batch() {
    if (policy >= 0) pthread_setschedparam(pthread_self(), policy, &param);
  }
#endif
};

int run_steps(Runner& r, int m) {
  Method& method = *r.methods[m];
  Batch batch;
  r.temp_allocator.reset();
  for (;;) {
    if (r.holds.load(std::memory_order_acquire) > 0) {
      std::unique_lock<std::mutex> lock(r.hold_mutex);
      r.released.wait(lock, [&r] { return r.holds.load(std::memory_order_acquire) == 0; });
    }
    Error err = method.step();
    if (err == Error::EndOfMethod) break;
    if (err != Error::Ok) {
      r.broken = "method " + r.names[m] + " failed part way; reload the program";
      return fail("method %s failed (error 0x%x)", r.names[m].c_str(), (unsigned)err);
    }
  }
  Error err = method.reset_execution();
  if (err != Error::Ok) return fail("method %s: reset after the run (error 0x%x)",
                                    r.names[m].c_str(), (unsigned)err);
  return 0;
}

// The arenas every method of the program needs: per planned buffer index, the largest size.
int plan_arenas(Runner& r) {
  std::vector<int64_t> sizes;
  for (size_t m = 0; m < r.program->num_methods(); ++m) {
    Result<const char*> name = r.program->get_method_name(m);
    if (!name.ok()) return fail("method %zu has no name (error 0x%x)", m, (unsigned)name.error());
    Result<MethodMeta> meta = r.program->method_meta(name.get());
    if (!meta.ok()) return fail("no metadata for method %s (error 0x%x)", name.get(),
                                (unsigned)meta.error());
    for (size_t j = 0; j < meta->num_memory_planned_buffers(); ++j) {
      Result<int64_t> size = meta->memory_planned_buffer_size(j);
      if (!size.ok()) return fail("method %s: planned buffer %zu (error 0x%x)", name.get(), j,
                                  (unsigned)size.error());
      if (sizes.size() <= j) sizes.resize(j + 1, 0);
      sizes[j] = std::max(sizes[j], size.get());
    }
  }
  for (int64_t size : sizes) r.arenas.emplace_back(static_cast<size_t>(size));
  for (auto& arena : r.arenas) r.spans.emplace_back(arena.data(), arena.size());
  r.planned = std::make_unique<HierarchicalAllocator>(
      Span<Span<uint8_t>>(r.spans.data(), r.spans.size()));
  r.memory = std::make_unique<MemoryManager>(&r.method_allocator, r.planned.get(),
                                             &r.temp_allocator);
  return 0;
}

Runner* open(std::unique_ptr<Runner> r, const char* what) {
  static std::once_flag init;
  std::call_once(init, [] { executorch::runtime::runtime_init(); });
  Result<Program> program =
      Program::load(r->loader.get(), Program::Verification::InternalConsistency);
  if (!program.ok()) {
    fail("%s: ExecuTorch cannot load the program (error 0x%x)", what,
         (unsigned)program.error());
    return nullptr;
  }
  r->program = std::make_unique<Program>(std::move(program.get()));
  if (plan_arenas(*r) != 0) return nullptr;
  return r.release();
}

// storage for the outputs the program does not plan, set before every run (as the pybindings)
int set_output_storage(Runner& r, int m) {
  Method& method = *r.methods[m];
  auto& storage = r.output_storage[m];
  if (storage.empty()) {
    MethodMeta meta = method.method_meta();
    storage.resize(method.outputs_size());
    for (size_t i = 0; i < storage.size(); ++i) {
      Result<executorch::runtime::Tag> tag = meta.output_tag(i);
      if (!tag.ok() || tag.get() != executorch::runtime::Tag::Tensor) continue;
      auto info = meta.output_tensor_meta(i);
      if (!info.ok()) return fail("%s: output %zu has no metadata", meta.name(), i);
      if (!info->is_memory_planned()) storage[i].resize(info->nbytes());
    }
  }
  for (size_t i = 0; i < storage.size(); ++i) {
    if (storage[i].empty()) continue;
    Error err = method.set_output_data_ptr(storage[i].data(), storage[i].size(), i);
    if (err != Error::Ok) return fail("%s: output %zu storage (error 0x%x)",
                                      method.method_meta().name(), i, (unsigned)err);
  }
  return 0;
}

// the method's outputs, checked to be tensors of at most MAX_DIM dimensions, into `values`
int get_outputs(Method& method, std::vector<EValue>& values) {
  size_t n = method.outputs_size();
  values.resize(n);
  Error err = method.get_outputs(values.data(), n);
  if (err != Error::Ok) return fail("get_outputs (error 0x%x)", (unsigned)err);
  for (size_t i = 0; i < n; ++i) {
    if (!values[i].isTensor()) return fail("output %zu is not a tensor", i);
    const Tensor& t = values[i].toTensor();
    if (t.dim() > MAX_DIM) return fail("output %zu has %zd dimensions", i, (ssize_t)t.dim());
  }
  return 0;
}

int check(Runner* r, int m) {
  if (r == nullptr) return fail("no program");
  if (m < 0 || static_cast<size_t>(m) >= r->methods.size()) return fail("no method %d", m);
  if (!r->broken.empty()) return fail("%s", r->broken.c_str());
  return 0;
}

}  // namespace

extern "C" {

const char* et_runner_error(void) { return last_error.c_str(); }

// A program from a .pte file (mapped, as the pybindings map it), or NULL.
void* et_runner_open_file(const char* path) {
  auto r = std::make_unique<Runner>();
  Result<MmapDataLoader> loader =
      MmapDataLoader::from(path, MmapDataLoader::MlockConfig::UseMlockIgnoreErrors);
  if (!loader.ok()) {
    fail("%s: cannot map the file (error 0x%x)", path, (unsigned)loader.error());
    return nullptr;
  }
  r->loader = std::make_unique<MmapDataLoader>(std::move(loader.get()));
  return open(std::move(r), path);
}

// A program from `size` bytes at `data` (copied: the caller may reuse its buffer), or NULL.
void* et_runner_open_buffer(const void* data, size_t size, const char* what) {
  auto r = std::make_unique<Runner>();
  r->blob.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + size);
  r->loader = std::make_unique<BufferDataLoader>(r->blob.data(), r->blob.size());
  return open(std::move(r), what);
}

void et_runner_close(void* handle) { delete static_cast<Runner*>(handle); }

// Hold (on != 0) or release (on == 0) the program: while it is held more times than released,
// its runs pause before their next instruction. Returns the holds now, or -1.
int et_runner_hold(void* handle, int on) {
  auto* r = static_cast<Runner*>(handle);
  if (r == nullptr) return fail("no program");
  std::lock_guard<std::mutex> lock(r->hold_mutex);
  int now = r->holds.load() + (on ? 1 : -1);
  if (now < 0) return fail("released more often than held");
  r->holds.store(now, std::memory_order_release);
  if (now == 0) r->released.notify_all();
  return now;
}

// Method `name`, loaded on the first call (which initialises the mutable buffers it uses: the
// shared ones too); its index, or -1.
int et_runner_load_method(void* handle, const char* name) {
  auto* r = static_cast<Runner*>(handle);
  if (r == nullptr) return fail("no program");
  std::lock_guard<std::mutex> lock(r->mutex);
  for (size_t m = 0; m < r->names.size(); ++m)
    if (r->names[m] == name) return static_cast<int>(m);
  Result<Method> method = r->program->load_method(name, r->memory.get());
  if (!method.ok()) return fail("cannot load method %s (error 0x%x)", name,
                                (unsigned)method.error());
  r->names.emplace_back(name);
  r->methods.push_back(std::make_unique<Method>(std::move(method.get())));
  r->output_storage.emplace_back();
  return static_cast<int>(r->methods.size() - 1);
}

// Where attribute (named mutable buffer) `name` of method `m` lies: its data, dtype
// (ExecuTorch ScalarType), dimensions and sizes (at most `max_dim`). 0, or -1.
int et_runner_attribute(void* handle, int m, const char* name, void** data, int32_t* dtype,
                        int32_t* ndim, int64_t* sizes, int32_t max_dim) {
  auto* r = static_cast<Runner*>(handle);
  if (check(r, m) != 0) return -1;
  Result<Tensor> t = r->methods[m]->get_attribute(name);
  if (!t.ok()) return fail("method %s has no attribute %s (error 0x%x)", r->names[m].c_str(),
                           name, (unsigned)t.error());
  if (t->dim() > max_dim) return fail("attribute %s has %zd dimensions", name,
                                      (ssize_t)t->dim());
  *data = t->mutable_data_ptr();
  *dtype = static_cast<int32_t>(t->scalar_type());
  *ndim = static_cast<int32_t>(t->dim());
  for (ssize_t d = 0; d < t->dim(); ++d) sizes[d] = t->size(d);
  return 0;
}

// Run method `m` on `n` contiguous tensor inputs (input i: dtypes[i], ndims[i] dimensions whose
// sizes follow one another in `sizes`, data[i]). On success the outputs stay pending, the
// program's mutex held, until the same thread takes (et_runner_take_outputs) or releases
// (et_runner_release_outputs) them; their count, or -1 (nothing pending).
int et_runner_execute(void* handle, int m, int n, const int32_t* dtypes, const int32_t* ndims,
                      const int64_t* sizes, void* const* data) {
  auto* r = static_cast<Runner*>(handle);
  pending.release();  // outputs of a run never taken: dropped
  if (check(r, m) != 0) return -1;
  Method& method = *r->methods[m];
  if (n < 0 || static_cast<size_t>(n) != method.inputs_size())
    return fail("method %s takes %zu inputs, got %d", r->names[m].c_str(),
                method.inputs_size(), n);
  // the inputs' shapes, in ExecuTorch's types, alive until the run is over
  std::vector<std::vector<TensorImpl::SizesType>> shape(n);
  std::vector<std::vector<TensorImpl::DimOrderType>> order(n);
  std::vector<std::vector<TensorImpl::StridesType>> strides(n);
  std::vector<TensorImpl> impls;
  impls.reserve(n);
  for (int i = 0; i < n; ++i) {
    int k = ndims[i];
    if (k < 0 || k > MAX_DIM) return fail("input %d has %d dimensions", i, k);
    shape[i].assign(sizes, sizes + k);
    sizes += k;
    order[i].resize(k);
    strides[i].resize(k);
    TensorImpl::StridesType stride = 1;
    for (int d = k - 1; d >= 0; --d) {
      order[i][d] = static_cast<TensorImpl::DimOrderType>(d);
      strides[i][d] = stride;
      stride *= shape[i][d];
    }
    impls.emplace_back(static_cast<ScalarType>(dtypes[i]), k, shape[i].data(), data[i],
                       order[i].data(), strides[i].data());
  }
  std::unique_lock<std::mutex> lock(r->mutex);
  for (int i = 0; i < n; ++i) {
    Error err = method.set_input(EValue(Tensor(&impls[i])), i);
    if (err != Error::Ok) return fail("method %s: input %d does not fit (error 0x%x)",
                                      r->names[m].c_str(), i, (unsigned)err);
  }
  if (set_output_storage(*r, m) != 0) return -1;
  if (run_steps(*r, m) != 0) return -1;
  std::vector<EValue> values;
  if (get_outputs(method, values) != 0) return -1;
  pending.values = std::move(values);
  pending.lock = std::move(lock);
  return static_cast<int>(pending.values.size());
}

// Output `i` of the calling thread's pending run: dtype, dimensions, sizes (MAX_DIM), bytes.
int et_runner_output(int i, int32_t* dtype, int32_t* ndim, int64_t* sizes, int64_t* nbytes) {
  if (i < 0 || static_cast<size_t>(i) >= pending.values.size()) return fail("no output %d", i);
  const Tensor& t = pending.values[i].toTensor();
  *dtype = static_cast<int32_t>(t.scalar_type());
  *ndim = static_cast<int32_t>(t.dim());
  for (ssize_t d = 0; d < t.dim(); ++d) sizes[d] = t.size(d);
  *nbytes = static_cast<int64_t>(t.nbytes());
  return 0;
}

// Copy the calling thread's pending outputs into dst[0..n) (each et_runner_output's nbytes,
// contiguous) and release the program. 0, or -1 (released too).
int et_runner_take_outputs(int n, void* const* dst) {
  if (n != static_cast<int>(pending.values.size())) {
    int held = static_cast<int>(pending.values.size());
    pending.release();
    return fail("%d outputs held, %d asked for", held, n);
  }
  for (int i = 0; i < n; ++i) {
    const Tensor& t = pending.values[i].toTensor();
    if (t.nbytes()) std::memcpy(dst[i], t.const_data_ptr(), t.nbytes());
  }
  pending.release();
  return 0;
}

// Drop the calling thread's pending outputs, releasing the program (a caller that could not
// take them).
void et_runner_release_outputs() { pending.release(); }

}  // extern "C"
