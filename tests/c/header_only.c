/* ddim.h compiles on its own as strict C99. */
#include <ddim/ddim.h>

int ddim_header_c99_check(void);
int ddim_header_c99_check(void) { return DDIM_ABI_VERSION + (int)sizeof(ddim_sample_options); }
