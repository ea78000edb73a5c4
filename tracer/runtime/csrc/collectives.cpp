// Collectives recorded inside traced graphs: tpserve::all_reduce / tpserve::all_gather.
//
// At run time each rank is a thread of one process (see tracer/runtime/rank_threads.py). A thread binds itself
// to a group and a rank; the op then exchanges tensors with the other rank threads through shared
// slots and a spin barrier (a few microseconds; a Python barrier costs ~150 us). While tracing, a
// thread binds "trace mode": the op returns a tensor of the right shape without communicating, so
// ranks can be traced one at a time. In a process executor (one process per rank) the thread binds
// a torch.distributed process group by name, and the same saved graph's ops run c10d's functional
// collectives (gloo on CPU, NCCL on CUDA).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Group {
  explicit Group(int64_t world_size) : world(world_size), slots(world_size) {}
  const int64_t world;
  std::vector<at::Tensor> slots;
  std::atomic<int64_t> arrived{0};
  std::atomic<int64_t> generation{0};
  std::atomic<bool> aborted{false};
  std::atomic<int64_t> timeout_ms{120000};
};

std::mutex registry_mutex;
std::unordered_map<std::string, std::shared_ptr<Group>> registry;

enum class Mode { Unbound, Trace, Bound, ProcessGroup };
thread_local Mode mode = Mode::Unbound;
thread_local std::shared_ptr<Group> bound_group;
thread_local std::string bound_name;
thread_local int64_t bound_rank = -1;
thread_local int64_t collective_ns = 0;  // time this thread spent inside collectives

std::shared_ptr<Group> find_group(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find(name);
  TORCH_CHECK(it != registry.end(), "tpserve: no collective group named '", name, "'");
  return it->second;
}

void wait_for_all_ranks(Group& g) {
  const int64_t gen = g.generation.load(std::memory_order_acquire);
  if (g.arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == g.world) {
    // Last to arrive: reset the count before releasing the others, so none can re-enter early.
    g.arrived.store(0, std::memory_order_relaxed);
    g.generation.store(gen + 1, std::memory_order_release);
    return;
  }
  const auto start = Clock::now();
  const auto timeout = std::chrono::milliseconds(g.timeout_ms.load());
  for (int64_t spins = 0;; ++spins) {
    if (g.generation.load(std::memory_order_acquire) != gen) return;
    TORCH_CHECK(!g.aborted.load(std::memory_order_acquire),
                "tpserve collective aborted: another rank of '", bound_name, "' failed");
    // Spin briefly (the peer is usually microseconds away), then give the core away: with more
    // ranks than cores a pure spin would starve the rank we are waiting for.
    if (spins > 2000) {
      std::this_thread::yield();
      if ((spins & 1023) == 0 && Clock::now() - start > timeout) {
        g.aborted.store(true, std::memory_order_release);
        TORCH_CHECK(false, "tpserve collective timed out after ", timeout.count(),
                    " ms waiting for the other ranks of '", bound_name, "'");
      }
    }
  }
}

Group& group_for(const std::string& op, int64_t rank, int64_t world) {
  TORCH_CHECK(mode == Mode::Bound, "tpserve::", op,
              " ran outside a rank thread: load the model with tracer.parallel_model_load");
  TORCH_CHECK(rank == bound_rank && world == bound_group->world, "tpserve::", op,
              ": graph traced for rank ", rank, " of ", world, " runs on rank ", bound_rank,
              " of ", bound_group->world);
  return *bound_group;
}

struct Timer {
  Clock::time_point start = Clock::now();
  ~Timer() {
    collective_ns +=
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
  }
};

// Calls a _c10d_functional op on the bound process group, then waits for its result.
at::Tensor c10d_call(const char* op, std::vector<c10::IValue> args) {
  static const auto wait = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, "");
  torch::jit::Stack stack(std::move(args));
  handle.callBoxed(stack);
  torch::jit::Stack waited{stack[0]};
  wait.callBoxed(waited);
  return waited[0].toTensor();
}

at::Tensor all_reduce(const at::Tensor& x, int64_t rank, int64_t world) {
  if (mode == Mode::Trace) return x.clone();
  if (mode == Mode::ProcessGroup) {
    Timer timer;
    return c10d_call("_c10d_functional::all_reduce", {x.contiguous(), std::string("sum"), bound_name});
  }
  Timer timer;
  Group& g = group_for("all_reduce", rank, world);
  g.slots[rank] = x.contiguous();
  wait_for_all_ranks(g);
  // Every rank sums in rank order, so all ranks hold bit-identical results.
  at::Tensor out = g.slots[0].clone();
  for (int64_t r = 1; r < g.world; ++r) out.add_(g.slots[r]);
  wait_for_all_ranks(g);  // nobody may overwrite a slot before all have read it
  g.slots[rank] = at::Tensor();
  return out;
}

at::Tensor all_gather(const at::Tensor& x, int64_t dim, int64_t rank, int64_t world) {
  if (mode == Mode::Trace) return at::cat(std::vector<at::Tensor>(world, x), dim);
  if (mode == Mode::ProcessGroup) {
    Timer timer;
    auto stacked = c10d_call("_c10d_functional::all_gather_into_tensor", {x.contiguous(), world, bound_name});
    return at::cat(stacked.chunk(world, 0), dim);  // [world * d0, ...] -> ranks side by side on dim
  }
  Timer timer;
  Group& g = group_for("all_gather", rank, world);
  g.slots[rank] = x.contiguous();
  wait_for_all_ranks(g);
  at::Tensor out = at::cat(g.slots, dim);
  wait_for_all_ranks(g);
  g.slots[rank] = at::Tensor();
  return out;
}

void create_group(c10::string_view name, int64_t world) {
  TORCH_CHECK(world >= 1, "tpserve: world size must be >= 1");
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry[std::string(name)] = std::make_shared<Group>(world);
}

void destroy_group(c10::string_view name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(std::string(name));
}

void bind(c10::string_view name, int64_t rank) {
  auto g = find_group(std::string(name));
  TORCH_CHECK(rank >= 0 && rank < g->world, "tpserve: rank ", rank, " out of range");
  bound_group = g;
  bound_name = std::string(name);
  bound_rank = rank;
  mode = Mode::Bound;
}

void bind_process_group(c10::string_view group_name) {
  bound_group.reset();
  bound_name = std::string(group_name);
  bound_rank = -1;
  mode = Mode::ProcessGroup;
}

void bind_trace() {
  bound_group.reset();
  bound_rank = -1;
  mode = Mode::Trace;
}

void unbind() {
  bound_group.reset();
  bound_rank = -1;
  mode = Mode::Unbound;
}

void abort_group(c10::string_view name) {
  find_group(std::string(name))->aborted.store(true, std::memory_order_release);
}

// Only call when no rank thread is inside a collective (the executor joins the call first).
void reset_group(c10::string_view name) {
  auto g = find_group(std::string(name));
  for (auto& slot : g->slots) slot = at::Tensor();
  g->arrived.store(0);
  g->aborted.store(false, std::memory_order_release);
}

void set_timeout(c10::string_view name, int64_t ms) {
  find_group(std::string(name))->timeout_ms.store(ms);
}

int64_t take_collective_ns() {
  int64_t ns = collective_ns;
  collective_ns = 0;
  return ns;
}

}  // namespace

TORCH_LIBRARY(tpserve, m) {
  // No group argument: the group is the one this thread bound (_bind / _bind_process_group).
  m.def("all_reduce(Tensor x, int rank, int world_size) -> Tensor");
  m.def("all_gather(Tensor x, int dim, int rank, int world_size) -> Tensor");
  m.def("_create_group(str name, int world_size) -> ()", &create_group);
  m.def("_destroy_group(str name) -> ()", &destroy_group);
  m.def("_bind(str name, int rank) -> ()", &bind);
  m.def("_bind_trace() -> ()", &bind_trace);
  m.def("_bind_process_group(str group_name) -> ()", &bind_process_group);
  m.def("_unbind() -> ()", &unbind);
  m.def("_abort(str name) -> ()", &abort_group);
  m.def("_reset(str name) -> ()", &reset_group);
  m.def("_set_timeout(str name, int ms) -> ()", &set_timeout);
  m.def("_take_collective_ns() -> int", &take_collective_ns);
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("all_reduce", TORCH_FN(all_reduce));
  m.impl("all_gather", TORCH_FN(all_gather));
}
