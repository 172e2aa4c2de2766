// The table build.rs generates: one entry per `extern "C" __global__` kernel.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

namespace emu {
constexpr size_t kMaxArgs = 32;
}

struct EmuKernel {
    const char* name;
    void (*tramp)(void** args);
    size_t nargs;
    size_t arg_sizes[emu::kMaxArgs];
};

extern "C" const EmuKernel* popen_emu_find(const char* name);

namespace emu {
// Call `f` with its arguments read from an array of pointers to them (the same
// argument array that cuLaunchKernel takes).
template <class... Args, size_t... I>
inline void call_with(void (*f)(Args...), void** a, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(a[I])...);
}
template <class... Args>
inline void call(void (*f)(Args...), void** a) {
    call_with(f, a, std::index_sequence_for<Args...>{});
}
template <class... Args>
constexpr EmuKernel entry(const char* name, void (*tramp)(void**), void (*)(Args...)) {
    static_assert(sizeof...(Args) <= kMaxArgs, "too many kernel arguments");
    return EmuKernel{name, tramp, sizeof...(Args), {sizeof(Args)...}};
}
}  // namespace emu
