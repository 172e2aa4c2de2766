// Host runtime of the CUDA emulator: workers, fibers, barriers, warp exchange.
// See cuda_emu.h for the model.  Launches are reentrant: every launch makes its own
// workers, and all per-block state lives in the worker's thread_local storage.
#include "cuda_emu.h"
#include "emu_api.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// Fiber switching.  On x86-64, a switch of our own (`popen_emu_switch` below): glibc's
// swapcontext also saves and restores the signal mask, a system call at every switch,
// and switches (two per thread at every barrier and warp collective) were 51 % of
// tests/kernel_attention.rs's time under perf, 14 points of it in the kernel.  Elsewhere,
// and under a sanitizer (POPEN_EMU_SANITIZE defines POPEN_EMU_UCONTEXT: AddressSanitizer
// follows stack switches by intercepting swapcontext), ucontext.
#if defined(__x86_64__) && !defined(POPEN_EMU_UCONTEXT)
#define EMU_OWN_SWITCH 1
#else
#define EMU_OWN_SWITCH 0
#include <ucontext.h>
#endif

namespace emu {
namespace {

#if EMU_OWN_SWITCH
// popen_emu_switch(from, to): pushes the callee-saved registers of the System V ABI
// (rbp, rbx, r12–r15) on the running stack, stores its stack pointer in *from, takes
// `to` as the stack pointer, pops that stack's registers and returns into it.  The ABI's
// other callee-saved state, MXCSR and the x87 control word, is not switched: no kernel
// changes rounding or exception modes, so every fiber runs with its worker's.
extern "C" void popen_emu_switch(void** from, void* to);
asm(R"(
    .text
    .p2align 4
    .globl popen_emu_switch
    .hidden popen_emu_switch
    .type popen_emu_switch, @function
popen_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size popen_emu_switch, .-popen_emu_switch
)");

// A suspended fiber or scheduler: its stack pointer, under the registers
// popen_emu_switch pushed.
struct Ctx {
    void* sp = nullptr;
};

// `c` starts `entry` on the stack [stack, stack + len) at its first switch: the stack
// holds six zero registers (rbp = 0 ends a backtrace there), then `entry` for
// popen_emu_switch's `ret`, then a null return address for `entry`, which must never
// return.  Its rsp is then 8 mod 16, as after a call.
void ctx_make(Ctx& c, char* stack, size_t len, void (*entry)()) {
    void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + len) & ~uintptr_t{15});
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(entry);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    c.sp = sp;
}

// Suspend the running code in `from` and resume `to`.
inline void ctx_swap(Ctx& from, Ctx& to) { popen_emu_switch(&from.sp, to.sp); }
#else
struct Ctx {
    ucontext_t uc;
};

void ctx_make(Ctx& c, char* stack, size_t len, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = len;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

inline void ctx_swap(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr int kWarp = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
// What an H100/H200 block may ask for (opt-in limit), so a launch that would fail on
// the GPU fails here too.
constexpr unsigned kMaxDynShared = 227 * 1024;
constexpr size_t kFiberStack = 256 * 1024;
// Static shared memory per block on the GPU (without opt-in).
constexpr size_t kMaxStaticShared = 48 * 1024;
// What shared memory holds before a block writes it: all-ones bytes, NaN as an f32
// (and as an f64), -1 as an integer.
constexpr uint8_t kSharedPoison = 0xff;
// Dynamic shared memory is one buffer of kMaxDynShared + kDynGuard bytes per worker,
// poisoned once whole and then, before each block, the part the launch asked for.  The
// kDynGuard bytes past that part are checked after each block and the rest of the
// buffer when the worker is done, so a write past the launch's size is an error (the GPU faults on an
// out-of-range shared address), not a heap corruption or a silent success.
constexpr size_t kDynGuard = 4096;
// Each static shared array is followed in the pool by kStaticGuard bytes of poison that
// no array owns, checked after each block: a write past an array (on the GPU it lands in
// the next array or in nothing, silently) is an error here.  The 48 KB limit counts the
// arrays as the GPU lays them out, without the guards.
constexpr size_t kStaticGuard = 64;
constexpr size_t kStaticPool = 2 * kMaxStaticShared;  // arrays and their guards

enum class State : uint8_t { Runnable, AtBlockBar, AtWarpBar, Exited };

struct Fiber {
    Ctx resume;  // where the fiber goes on at its next switch
    ThreadCtx ctx;
    State state;
    unsigned warp_mask;  // mask given at a warp barrier
    uint32_t seq;        // warp collectives this thread has entered
    size_t shared_off;   // static shared memory this thread has declared so far
    size_t shared_gpu;   // the same as the GPU lays it out (no guards)
    const char* bar_file;  // call site of the __syncthreads it waits at
    int bar_line;
};

struct Slot {
    uint64_t bits;
    uint32_t seq;  // which collective wrote it; a stale slot means the lane did not take part
};

// One lane's operands of a warp-wide 16×8×8 product (warp_mma_tf32_16x8x8), as TF32.
struct MmaSlot {
    float a[4], b[2];
    uint32_t seq;
};

struct WarpState {
    Slot xchg[2][kWarp];
    MmaSlot mma[2][kWarp];
};

struct Worker {
    std::vector<Fiber> fibers;
    std::vector<WarpState> warps;
    char* stacks = nullptr;
    size_t stacks_len = 0;
    Ctx sched;
    int current = -1;
    std::vector<uint8_t> dyn;  // kMaxDynShared + kDynGuard bytes; the launch uses `shmem`
    size_t shmem = 0;
    std::vector<uint8_t> static_pool;
    size_t static_touched = 0;  // bytes of static_pool handed out so far (re-poisoned per block)
    std::vector<std::pair<size_t, size_t>> static_guards;  // (guard offset, its array's bytes)
    const EmuKernel* kernel = nullptr;
    void** args = nullptr;
    std::string error;
};

thread_local Worker* tl_worker = nullptr;

// A worker's memory, kept between launches: fiber stacks whose pages are already mapped
// in, and the shared-memory buffers, poisoned whole.  Mapping and poisoning them afresh
// for every launch (and faulting the stacks in) cost `popen predict --device emu`, whose
// launches are many and small, a quarter of its time (65 s, 49 s with the memory kept).
// A launch's workers are threads of their own, so the memory waits in one list for any
// launch.
struct Kept {
    char* stacks = nullptr;
    size_t stacks_len = 0;
    std::vector<uint8_t> dyn, static_pool;
};
constexpr size_t kMaxKept = 16;  // the rest is unmapped and freed
struct KeptList {
    std::mutex mu;
    std::vector<Kept> list;
};
// Never destroyed: a launch on another thread may still give memory back while the
// process exits.
KeptList& kept() {
    static KeptList* k = new KeptList;
    return *k;
}

// Memory with stacks for `nthreads` fibers into w, kept or new; false if none can be
// mapped.
bool take_memory(Worker& w, unsigned nthreads) {
    const size_t need = (size_t)nthreads * kFiberStack;
    Kept k;
    {
        KeptList& kl = kept();
        std::lock_guard<std::mutex> g(kl.mu);
        auto it = std::find_if(kl.list.begin(), kl.list.end(), [&](const Kept& e) { return e.stacks_len >= need; });
        if (it != kl.list.end()) {
            k = std::move(*it);
            kl.list.erase(it);
        }
    }
    if (!k.stacks) {
        void* mem = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) return false;
        k.stacks = (char*)mem;
        k.stacks_len = need;
        k.dyn.assign(kMaxDynShared + kDynGuard, kSharedPoison);
        k.static_pool.assign(kStaticPool, kSharedPoison);
    }
    w.stacks = k.stacks;
    w.stacks_len = k.stacks_len;
    w.dyn = std::move(k.dyn);
    w.static_pool = std::move(k.static_pool);
    return true;
}

// Gives w's memory back for later launches when `clean` (its last check found nothing
// written past the launch's dynamic shared memory), that memory poisoned again where
// the launch may have written it; otherwise, or when enough is kept, frees it.  (The
// static pool needs nothing: a launch poisons each array and its guard when it is
// first declared.)
void give_memory(Worker& w, bool clean) {
    Kept k;
    k.stacks = w.stacks;
    k.stacks_len = w.stacks_len;
    w.stacks = nullptr;
    if (clean) {
        std::fill(w.dyn.begin(), w.dyn.begin() + (ptrdiff_t)w.shmem, kSharedPoison);
        k.dyn = std::move(w.dyn);
        k.static_pool = std::move(w.static_pool);
        KeptList& kl = kept();
        std::lock_guard<std::mutex> g(kl.mu);
        if (kl.list.size() < kMaxKept) {
            kl.list.push_back(std::move(k));
            return;
        }
    }
    munmap(k.stacks, k.stacks_len);
}

Fiber& cur_fiber() { return tl_worker->fibers[tl_worker->current]; }

void yield_to_sched() {
    Worker* w = tl_worker;
    ctx_swap(w->fibers[w->current].resume, w->sched);
}

void fiber_entry() {
    Worker* w = tl_worker;
    w->kernel->tramp(w->args);
    // Returning from the kernel leaves the live set; the scheduler decides when the
    // block is done (all fibers exited), so early returns never strand a barrier.
    Fiber& f = w->fibers[w->current];
    f.state = State::Exited;
    ctx_swap(f.resume, w->sched);  // never resumed: run_block makes its context anew
}

// Where dyn[from, to) was written (is not poison), or `to`.
size_t first_written(const std::vector<uint8_t>& dyn, size_t from, size_t to) {
    size_t i = from;
    for (; i + 8 <= to; i += 8) {  // 8 bytes a step; the byte loop below finds which
        uint64_t word;
        std::memcpy(&word, dyn.data() + i, 8);
        if (word != 0x0101010101010101ull * kSharedPoison) break;
    }
    for (; i < to; ++i)
        if (dyn[i] != kSharedPoison) return i;
    return to;
}

// An error if a block wrote dyn[from, to), past the launch's dynamic shared memory.
bool dyn_overrun(Worker& w, size_t from, size_t to, const char* who) {
    const size_t hit = first_written(w.dyn, from, to);
    if (hit == to) return false;
    char buf[256];
    snprintf(buf, sizeof buf, "kernel %s: %s wrote byte %zu of dynamic shared memory, past the %zu bytes it was "
             "launched with", w.kernel->name, who, hit, w.shmem);
    w.error = buf;
    return true;
}

// An error if a block wrote a static shared array's guard.
bool static_overrun(Worker& w, const char* who) {
    for (size_t i = 0; i < w.static_guards.size(); ++i) {
        const auto [at, bytes] = w.static_guards[i];
        const size_t hit = first_written(w.static_pool, at, at + kStaticGuard);
        if (hit == at + kStaticGuard) continue;
        char buf[256];
        snprintf(buf, sizeof buf, "kernel %s: %s wrote byte %zu of its static shared array %zu (SHARED, %zu "
                 "bytes), past its end", w.kernel->name, who, bytes + (hit - at), i, bytes);
        w.error = buf;
        return true;
    }
    return false;
}

// Run one block to completion on this worker.  Returns false on an error (w.error):
// deadlock, two different barriers, a write past the dynamic shared memory or past a
// static shared array.
bool run_block(Worker& w, unsigned nthreads) {
    const int nwarps = (int)((nthreads + kWarp - 1) / kWarp);
    w.error.clear();
    std::fill(w.dyn.begin(), w.dyn.begin() + (ptrdiff_t)w.shmem, kSharedPoison);
    std::fill(w.static_pool.begin(), w.static_pool.begin() + (ptrdiff_t)w.static_touched, kSharedPoison);
    for (auto& ws : w.warps) {
        for (auto& half : ws.xchg)
            for (auto& slot : half) slot.seq = UINT32_MAX;
        for (auto& half : ws.mma)
            for (auto& slot : half) slot.seq = UINT32_MAX;
    }
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = w.fibers[i];
        ctx_make(f.resume, w.stacks + (size_t)i * kFiberStack, kFiberStack, fiber_entry);
        f.state = State::Runnable;
        f.seq = 0;
        f.warp_mask = 0;
        f.shared_off = 0;
        f.shared_gpu = 0;
        f.bar_file = nullptr;
        f.bar_line = 0;
    }
    for (;;) {
        for (unsigned i = 0; i < nthreads; ++i) {
            if (w.fibers[i].state == State::Runnable) {
                w.current = (int)i;
                ctx_swap(w.sched, w.fibers[i].resume);
            }
        }
        w.current = -1;
        // Every fiber is now waiting or exited.  Release what can be released.
        bool released = false;
        unsigned live = 0, at_block = 0;
        for (unsigned i = 0; i < nthreads; ++i) {
            State s = w.fibers[i].state;
            if (s != State::Exited) ++live;
            if (s == State::AtBlockBar) ++at_block;
        }
        if (live == 0) {
            char who[64];
            const uint3 b = w.fibers[0].ctx.block_idx;
            snprintf(who, sizeof who, "block (%u,%u,%u)", b.x, b.y, b.z);
            return !dyn_overrun(w, w.shmem, w.shmem + kDynGuard, who) && !static_overrun(w, who);
        }
        for (int wi = 0; wi < nwarps; ++wi) {
            unsigned lo = (unsigned)wi * kWarp, hi = std::min(nthreads, lo + kWarp);
            unsigned live_lanes = 0, arrived = 0, need = 0;
            for (unsigned i = lo; i < hi; ++i) {
                const Fiber& f = w.fibers[i];
                if (f.state != State::Exited) live_lanes |= 1u << (i - lo);
                if (f.state == State::AtWarpBar) {
                    arrived |= 1u << (i - lo);
                    need |= f.warp_mask;
                }
            }
            if (arrived != 0 && (need & live_lanes & ~arrived) == 0 && arrived == (need & live_lanes)) {
                for (unsigned i = lo; i < hi; ++i)
                    if (w.fibers[i].state == State::AtWarpBar) w.fibers[i].state = State::Runnable;
                released = true;
            }
        }
        if (!released && at_block == live) {
            // One barrier per release: threads at two different __syncthreads would be
            // released together here, while on the GPU that is undefined behaviour.
            const Fiber* first = nullptr;
            for (unsigned i = 0; i < nthreads; ++i) {
                const Fiber& f = w.fibers[i];
                if (f.state != State::AtBlockBar) continue;
                if (!first) {
                    first = &f;
                } else if (f.bar_line != first->bar_line || std::strcmp(f.bar_file, first->bar_file) != 0) {
                    char buf[512];
                    snprintf(buf, sizeof buf,
                             "kernel %s block (%u,%u,%u): threads wait at two different __syncthreads "
                             "(thread %u at %s:%d, thread %u at %s:%d); undefined on the GPU",
                             w.kernel->name, f.ctx.block_idx.x, f.ctx.block_idx.y, f.ctx.block_idx.z,
                             (unsigned)(first - w.fibers.data()), first->bar_file, first->bar_line, i,
                             f.bar_file, f.bar_line);
                    w.error = buf;
                    return false;
                }
            }
            for (unsigned i = 0; i < nthreads; ++i)
                if (w.fibers[i].state == State::AtBlockBar) w.fibers[i].state = State::Runnable;
            released = true;
        }
        if (!released) {
            char buf[256];
            snprintf(buf, sizeof buf,
                     "deadlock in kernel %s block (%u,%u,%u): %u live threads, %u at __syncthreads, "
                     "the rest at a warp collective whose lanes diverged",
                     w.kernel->name, w.fibers[0].ctx.block_idx.x, w.fibers[0].ctx.block_idx.y,
                     w.fibers[0].ctx.block_idx.z, live, at_block);
            w.error = buf;
            return false;
        }
    }
}

}  // namespace

ThreadCtx& ctx() { return cur_fiber().ctx; }

void* dyn_shared() { return tl_worker->dyn.data(); }

void* static_shared(size_t bytes, size_t align) {
    Worker* w = tl_worker;
    Fiber& f = cur_fiber();
    f.shared_gpu = (f.shared_gpu + align - 1) / align * align + bytes;
    const size_t off = (f.shared_off + align - 1) / align * align;
    if (f.shared_gpu > kMaxStaticShared || off + bytes + kStaticGuard > w->static_pool.size()) {
        if (w->error.empty()) {
            w->error = std::string("kernel ") + w->kernel->name + ": more than " +
                       std::to_string(kMaxStaticShared) + " bytes of static shared memory";
        }
        return w->static_pool.data();
    }
    f.shared_off = off + bytes + kStaticGuard;
    if (f.shared_off > w->static_touched) {  // the first thread to declare this array
        std::fill(w->static_pool.begin() + (ptrdiff_t)w->static_touched,
                  w->static_pool.begin() + (ptrdiff_t)f.shared_off, kSharedPoison);
        w->static_guards.emplace_back(off + bytes, bytes);
        w->static_touched = f.shared_off;
    }
    return w->static_pool.data() + off;
}

void syncthreads(const char* file, int line) {
    Fiber& f = cur_fiber();
    f.state = State::AtBlockBar;
    f.bar_file = file;
    f.bar_line = line;
    yield_to_sched();
}

void check_align(const void* p, size_t align, const char* what) {
    if ((uintptr_t)p % align == 0) return;
    Worker* w = tl_worker;
    if (w->error.empty()) {
        char buf[256];
        snprintf(buf, sizeof buf, "kernel %s: thread %d: misaligned %s at %p (needs %zu-byte alignment; the GPU faults)",
                 w->kernel->name, w->current, what, p, align);
        w->error = buf;
    }
}

int lane_id() { return (int)(tl_worker->current % kWarp); }

void syncwarp(unsigned mask) {
    Fiber& f = cur_fiber();
    f.state = State::AtWarpBar;
    f.warp_mask = mask;
    yield_to_sched();
}

// Write this lane's slot for collective number `seq`, wait for the warp, and return
// the slot index used.  Double buffering by parity: a lane can only reach the next use
// of the same half after every lane has passed the barrier in between, i.e. has read.
static Slot* warp_publish(unsigned mask, uint64_t bits, uint32_t& seq_out) {
    Worker* w = tl_worker;
    int me = w->current;
    Fiber& f = w->fibers[me];
    uint32_t seq = f.seq++;
    Slot* half = w->warps[me / kWarp].xchg[seq & 1];
    half[me % kWarp] = Slot{bits, seq};
    syncwarp(mask);
    seq_out = seq;
    return half;
}

uint64_t warp_exchange(unsigned mask, uint64_t bits, int src) {
    uint32_t seq;
    Slot* half = warp_publish(mask, bits, seq);
    if (src < 0 || src >= kWarp) return bits;
    if (half[src].seq != seq) {
        // Reading a lane that did not take part (exited, or beyond blockDim) is
        // undefined on the GPU; make it a launch error here.
        Worker* w = tl_worker;
        if (w->error.empty()) {
            char buf[200];
            snprintf(buf, sizeof buf, "kernel %s: lane %d of warp %d read a shuffle value from lane %d, which did not take part (undefined on the GPU)",
                     w->kernel->name, w->current % kWarp, w->current / kWarp, src);
            w->error = buf;
        }
        return bits;
    }
    return half[src].bits;
}

// The lanes' fragments side by side (double-buffered by the same parity as the
// exchanges: `seq` counts both), one barrier, then each lane sums its four outputs in k
// order.  Every lane of the warp must take part (`mma.sync.aligned`).  The operands are
// TF32 as the tensor cores read them: the 19 high bits of each register (sign, exponent,
// 10 mantissa bits), the rest ignored; products of two such values are exact in f32, so
// each step is one f32 rounding of the sum, as an fma gives.
void warp_mma_tf32_16x8x8(float c[4], const unsigned a[4], const unsigned b[2]) {
    Worker* w = tl_worker;
    int me = w->current;
    Fiber& f = w->fibers[me];
    uint32_t seq = f.seq++;
    MmaSlot* half = w->warps[me / kWarp].mma[seq & 1];
    MmaSlot& mine = half[me % kWarp];
    auto tf32 = [](unsigned bits) {
        bits &= 0xffffe000u;
        float x;
        std::memcpy(&x, &bits, 4);
        return x;
    };
    for (int i = 0; i < 4; ++i) mine.a[i] = tf32(a[i]);
    for (int i = 0; i < 2; ++i) mine.b[i] = tf32(b[i]);
    mine.seq = seq;
    syncwarp(0xffffffffu);
    for (int l = 0; l < kWarp; ++l) {
        if (half[l].seq == seq) continue;
        if (w->error.empty()) {
            char buf[200];
            snprintf(buf, sizeof buf, "kernel %s: lane %d of warp %d did not take part in a warp-wide mma (undefined on the GPU)",
                     w->kernel->name, l, me / kWarp);
            w->error = buf;
        }
        return;
    }
    const int lane = me % kWarp, g = lane / 4, t = lane % 4;
    for (int k = 0; k < 8; ++k) {
        // A[row][k]: lane 4·row + k % 4, register (k < 4 ? 0 : 2) (+1 for rows 8..15);
        // B[k][n]: lane 4·n + k % 4, register (k < 4 ? 0 : 1)
        const int ra = k < 4 ? 0 : 2, rb = k < 4 ? 0 : 1, kl = k % 4;
        const float ag = half[4 * g + kl].a[ra], ag8 = half[4 * g + kl].a[ra + 1];
        const float b0 = half[4 * (2 * t) + kl].b[rb], b1 = half[4 * (2 * t + 1) + kl].b[rb];
        c[0] = std::fma(ag, b0, c[0]);
        c[1] = std::fma(ag, b1, c[1]);
        c[2] = std::fma(ag8, b0, c[2]);
        c[3] = std::fma(ag8, b1, c[3]);
    }
}

unsigned warp_ballot(unsigned mask, bool pred) {
    uint32_t seq;
    Slot* half = warp_publish(mask, pred ? 1 : 0, seq);
    unsigned out = 0;
    for (int l = 0; l < kWarp; ++l)
        if (half[l].seq == seq && half[l].bits) out |= 1u << l;
    return out;
}

}  // namespace emu

using namespace emu;

// Whether kernel `name` can run a block of `threads` threads with `shmem` bytes of
// dynamic shared memory: 1 yes, 0 no (the launch would fail), -1 no such kernel.
extern "C" int popen_emu_block_fits(const char* name, unsigned threads, unsigned shmem) {
    if (!popen_emu_find(name)) return -1;
    return threads >= 1 && threads <= kMaxThreadsPerBlock && shmem <= kMaxDynShared ? 1 : 0;
}

extern "C" int popen_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3],
                                unsigned shmem, void** args, size_t nargs, const size_t* arg_sizes,
                                unsigned max_workers, char* err, size_t errlen) {
    auto fail = [&](const std::string& m) {
        if (errlen) {
            snprintf(err, errlen, "%s", m.c_str());
        }
        return 1;
    };
    const EmuKernel* k = popen_emu_find(name);
    if (!k) return fail(std::string("no kernel named ") + name + " in kernels/*.cu");
    if (nargs != k->nargs)
        return fail(std::string(name) + ": launched with " + std::to_string(nargs) + " arguments, kernel takes " +
                    std::to_string(k->nargs));
    for (size_t i = 0; i < nargs; ++i)
        if (arg_sizes[i] != k->arg_sizes[i])
            return fail(std::string(name) + ": argument " + std::to_string(i) + " has " +
                        std::to_string(arg_sizes[i]) + " bytes, kernel parameter has " +
                        std::to_string(k->arg_sizes[i]));
    unsigned nthreads = block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > kMaxThreadsPerBlock)
        return fail(std::string(name) + ": block of " + std::to_string(nthreads) + " threads (1..=1024)");
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535)
        return fail(std::string(name) + ": invalid grid");
    if (shmem > kMaxDynShared)
        return fail(std::string(name) + ": " + std::to_string(shmem) + " bytes of dynamic shared memory (max " +
                    std::to_string(kMaxDynShared) + ")");

    const uint64_t nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    if (max_workers) hw = std::min(hw, max_workers);
    const unsigned nworkers = (unsigned)std::min<uint64_t>(hw, nblocks);
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex err_mu;
    std::string first_error;

    auto work = [&]() {
        Worker w;
        w.kernel = k;
        w.args = args;
        w.fibers.resize(nthreads);
        w.warps.resize((nthreads + kWarp - 1) / kWarp);
        w.shmem = shmem;
        if (!take_memory(w, nthreads)) {
            std::lock_guard<std::mutex> g(err_mu);
            first_error = "emulator: cannot map fiber stacks";
            failed = true;
            return;
        }
        tl_worker = &w;
        for (;;) {
            if (failed.load()) break;
            uint64_t b = next.fetch_add(1);
            if (b >= nblocks) break;
            uint3 bi{(unsigned)(b % grid[0]), (unsigned)((b / grid[0]) % grid[1]),
                     (unsigned)(b / ((uint64_t)grid[0] * grid[1]))};
            for (unsigned t = 0; t < nthreads; ++t) {
                ThreadCtx& c = w.fibers[t].ctx;
                c.thread_idx = {t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
                c.block_idx = bi;
                c.block_dim = {block[0], block[1], block[2]};
                c.grid_dim = {grid[0], grid[1], grid[2]};
            }
            if (!run_block(w, nthreads) || !w.error.empty()) {
                std::lock_guard<std::mutex> g(err_mu);
                if (first_error.empty()) first_error = w.error;
                failed = true;
                break;
            }
        }
        bool clean = false;
        if (!failed.load()) {
            if (dyn_overrun(w, w.shmem, w.dyn.size(), "a block")) {
                std::lock_guard<std::mutex> g(err_mu);
                if (first_error.empty()) first_error = w.error;
                failed = true;
            } else {
                clean = w.error.empty();
            }
        }
        tl_worker = nullptr;
        give_memory(w, clean);
    };

    if (nworkers <= 1) {
        work();
    } else {
        std::vector<std::thread> ts;
        for (unsigned i = 0; i < nworkers; ++i) ts.emplace_back(work);
        for (auto& t : ts) t.join();
    }
    if (failed) return fail(first_error);
    return 0;
}
