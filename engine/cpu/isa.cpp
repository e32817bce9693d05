// CPU feature detection and the DDIM_CPU_ISA override (engine/cpu/isa.hpp).
#include "cpu/isa.hpp"

#include <cstdlib>

#include "ddim/error.hpp"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace ddim::cpu {

namespace {

#if defined(__x86_64__)
// XCR0: which register states the OS saves (AVX: bits 1-2; AVX-512: 5-7; AMX tile data: 17-18).
unsigned long long xcr0() noexcept {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return 0;  // no OSXSAVE
  unsigned int lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

}  // namespace

const char* to_string(Isa isa) noexcept {
  switch (isa) {
    case Isa::Portable: return "portable";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512_bf16";
    case Isa::Amx: return "amx";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx})
    if (name == to_string(isa)) return isa;
  throw Error(ErrorCode::InvalidArgument, "DDIM_CPU_ISA=" + name +
                                              " is not an instruction-set level: use portable, avx2, avx512, "
                                              "avx512_bf16, amx or auto");
}

bool isa_supported(Isa isa, std::string* missing) noexcept {
  auto lacks = [&](const char* feature) {
    if (missing) *missing = feature;
    return false;
  };
  if (isa == Isa::Portable) return true;
#if defined(__x86_64__)
  __builtin_cpu_init();
  const unsigned long long x = xcr0();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return lacks("AVX2 and FMA");
  if ((x & 0x6) != 0x6) return lacks("OS support for AVX state (XCR0)");
  if (isa == Isa::Avx2) return true;
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl"))
    return lacks("AVX-512 (F, BW, VL)");
  if ((x & 0xE0) != 0xE0) return lacks("OS support for AVX-512 state (XCR0)");
  if (isa == Isa::Avx512) return true;
  if (isa == Isa::Avx512Bf16) return __builtin_cpu_supports("avx512bf16") ? true : lacks("AVX512-BF16");
  // Amx
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return lacks("AMX-BF16 (amx-tile, amx-bf16)");
  return lacks("AMX kernels (this build has none; bf16 runs on AVX512-BF16)");
#else
  return lacks("x86-64");
#endif
}

Isa detected_isa() noexcept {
  static const Isa best = [] {
    for (Isa isa : {Isa::Amx, Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2})
      if (isa_supported(isa)) return isa;
    return Isa::Portable;
  }();
  return best;
}

Isa active_isa() {
  const char* env = std::getenv("DDIM_CPU_ISA");
  if (!env || !*env || std::string(env) == "auto") return detected_isa();
  const Isa want = parse_isa(env);
  std::string missing;
  if (!isa_supported(want, &missing))
    throw Error(ErrorCode::Unsupported, std::string("DDIM_CPU_ISA=") + env + ": this CPU lacks " + missing +
                                            " (it has " + to_string(detected_isa()) + ")");
  return want;
}

Isa bf16_isa(Isa isa) {
  if (isa == Isa::Avx512Bf16 || isa == Isa::Amx) return Isa::Avx512Bf16;
  std::string missing;
  isa_supported(Isa::Avx512Bf16, &missing);
  const bool narrowed = isa != detected_isa();
  throw Error(ErrorCode::Unsupported,
              std::string("precision bf16 on the CPU needs AMX-BF16 or AVX512-BF16; ") +
                  (narrowed ? "DDIM_CPU_ISA=" + std::string(to_string(isa)) + " excludes both"
                            : "this CPU has neither (it lacks " + missing + ")") +
                  ": use --precision fp32, or the CUDA backend");
}

}  // namespace ddim::cpu
