// ddim.h compiles on its own as C++ (with the warnings of tests/c/CMakeLists.txt), with C linkage.
#include <ddim/ddim.h>

#include <type_traits>

static_assert(std::is_same_v<decltype(&ddim_session_sample),
                             ddim_status (*)(ddim_session*, const ddim_sample_options*, float*, size_t)>);
static_assert(std::is_trivially_copyable_v<ddim_sample_options> && std::is_standard_layout_v<ddim_sample_options>);
int ddim_header_cxx_check() { return DDIM_OK; }
