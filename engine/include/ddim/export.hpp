#pragma once
// DDIM_API marks what libddim exports: the documented ddim:: C++ API (this folder's headers). The
// library is built with hidden visibility by default (and a linker version script), so nothing
// else leaves it; the C API (ddim/ddim.h) has its own DDIM_C_API.
#if defined(_WIN32)
#define DDIM_API
#else
#define DDIM_API __attribute__((visibility("default")))
#endif
