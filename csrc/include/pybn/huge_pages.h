// Transparent huge pages for fresh output buffers. A tensor of tens of MB that torch's
// allocator has just mapped takes one page fault per 4 KiB page on its first write (50,178
// faults for a 102 MB forward and backward), which can cost more than the kernel that
// writes it; with the region advised for huge pages the kernel maps 2 MiB at a time. NumPy
// gives its own arrays of 4 MiB or more the same advice, so pybn asks for it only for the
// buffers it allocates through torch (src/pybn/torch/_layout.py).
#pragma once
#include <cstddef>

namespace pybn {

// Advise the whole pages inside [data, data + bytes) for transparent huge pages (Linux's
// madvise(MADV_HUGEPAGE)); true when the kernel took the advice, false where there is no
// such advice or it was refused. Only advice: memory contents and ownership are unchanged.
bool advise_huge_pages(void* data, std::size_t bytes);

}  // namespace pybn
