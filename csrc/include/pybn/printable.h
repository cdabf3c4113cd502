#pragma once
// Text from outside (an environment variable's value, a name) as it may appear in an error
// message. Python decodes a C++ exception's message as UTF-8: a byte that is not valid
// there (PYBN_ISA=sc\xe9lar from a Latin-1 shell) turned the ImportError naming the variable
// into a bare UnicodeDecodeError. Bytes outside printable ASCII are written as \xNN.
#include <string>

namespace pybn {

inline std::string printable(const std::string& text) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (const unsigned char c : text) {
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

}  // namespace pybn
