// Strict JSON for model files: the bytes must be valid UTF-8 (checked here, byte by byte, before
// the parser sees them) and no object may repeat a key at any depth. nlohmann's parser silently
// keeps the last of two equal keys, so a SAX handler builds the tree with one key set per object.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "ddim/error.hpp"
#include "format/container.hpp"

namespace ddim::format {
namespace {

using detail::quote_name;

constexpr const char* kHint = "re-export the model with tools/export.py";
// Nesting beyond this is rejected: no ddim document comes close, a hostile one might.
constexpr std::size_t kMaxJsonDepth = 128;

[[noreturn]] void fail(const std::string& what, const std::string& message) {
  throw Error(ErrorCode::InvalidFile, detail::bounded_message(what + ": " + message + "; " + kHint));
}

// Returns the length of the valid UTF-8 sequence at s[i], or 0 with `why` set when it is invalid.
std::size_t utf8_sequence_length(std::string_view s, std::size_t i, const char*& why) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b0 = byte(i);
  if (b0 < 0x80) return 1;
  std::size_t len = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 == 0xE0) {
    len = 3, lo = 0xA0;  // below: overlong
  } else if (b0 == 0xED) {
    len = 3, hi = 0x9F;  // above: UTF-16 surrogates U+D800..U+DFFF
  } else if (b0 >= 0xE1 && b0 <= 0xEF) {
    len = 3;
  } else if (b0 == 0xF0) {
    len = 4, lo = 0x90;  // below: overlong
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    len = 4;
  } else if (b0 == 0xF4) {
    len = 4, hi = 0x8F;  // above: beyond U+10FFFF
  } else {
    why = b0 < 0xC0   ? "unexpected continuation byte"
          : b0 < 0xC2 ? "overlong encoding"
                      : "byte that never occurs in UTF-8 (code point beyond U+10FFFF)";
    return 0;
  }
  if (s.size() - i < len) {
    why = "truncated multi-byte sequence";
    return 0;
  }
  const unsigned char b1 = byte(i + 1);
  if (b1 < 0x80 || b1 > 0xBF) {
    why = "truncated multi-byte sequence";
    return 0;
  }
  if (b1 < lo || b1 > hi) {
    why = b0 == 0xED ? "encoded UTF-16 surrogate" : b0 == 0xF4 ? "code point beyond U+10FFFF" : "overlong encoding";
    return 0;
  }
  for (std::size_t k = 2; k < len; ++k) {
    const unsigned char b = byte(i + k);
    if (b < 0x80 || b > 0xBF) {
      why = "truncated multi-byte sequence";
      return 0;
    }
  }
  return len;
}

void validate_utf8(std::string_view text, const std::string& what) {
  std::size_t i = 0;
  while (i < text.size()) {
    const char* why = "";
    const std::size_t len = utf8_sequence_length(text, i, why);
    if (len == 0) fail(what, "invalid UTF-8 at byte " + std::to_string(i) + " (" + why + ")");
    i += len;
  }
}

// One open object or array while parsing.
struct Frame {
  nlohmann::json* node = nullptr;        // the container, already linked into its parent
  std::unordered_set<std::string> keys;  // objects: the keys seen so far
  std::string key;                       // objects: the key whose value is being parsed
};

std::string pointer_token(const std::string& key) {
  std::string out;
  for (const char c : key) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

// Builds the document from SAX events, rejecting a repeated key in any object. (nlohmann's
// parser-callback interface would do too, but it rescans the parent after every nested object,
// which is quadratic in the number of tensors.) Pointers into the tree stay valid: a container
// only grows after its open child has been closed.
class StrictBuilder {
 public:
  using json = nlohmann::json;

  StrictBuilder(const std::string& what, const std::string& top_level_key_noun)
      : what_(what), top_level_key_noun_(top_level_key_noun) {}

  json take() { return std::move(root_); }

  bool null() { return add(json(nullptr)), true; }
  bool boolean(bool v) { return add(json(v)), true; }
  bool number_integer(json::number_integer_t v) { return add(json(v)), true; }
  bool number_unsigned(json::number_unsigned_t v) { return add(json(v)), true; }
  bool number_float(json::number_float_t v, const json::string_t&) { return add(json(v)), true; }
  bool string(json::string_t& v) { return add(json(std::move(v))), true; }
  bool binary(json::binary_t& v) { return add(json::binary(std::move(v))), true; }

  bool start_object(std::size_t) { return open(json::object()); }
  bool start_array(std::size_t) { return open(json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(json::string_t& k) {
    Frame& top = frames_.back();
    if (!top.keys.insert(k).second) {
      if (frames_.size() == 1) {
        fail(what_, "duplicate " + top_level_key_noun_ + " " + quote_name(k) + " (each may appear only once)");
      }
      fail(what_,
           "duplicate key " + quote_name(k) + " in the object at " + path() + " (each key may appear only once)");
    }
    top.key = std::move(k);
    return true;
  }

  bool parse_error(std::size_t, const std::string&, const json::exception& e) {
    fail(what_, std::string("not valid JSON (") + e.what() + ")");
  }

 private:
  // Links v into the innermost open container (or makes it the root); returns where it lives.
  json* add(json v) {
    if (frames_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& parent = *frames_.back().node;
    if (parent.is_object()) return &(parent[frames_.back().key] = std::move(v));
    parent.push_back(std::move(v));
    return &parent.back();
  }

  bool open(json container) {
    if (frames_.size() >= kMaxJsonDepth) {
      fail(what_, "JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels at " + path());
    }
    json* node = add(std::move(container));
    frames_.push_back(Frame{});
    frames_.back().node = node;
    return true;
  }

  bool close() {
    frames_.pop_back();
    return true;
  }

  // JSON pointer of the innermost open container.
  std::string path() const {
    std::string out;
    for (std::size_t f = 0; f + 1 < frames_.size(); ++f) {
      out += '/';
      const Frame& fr = frames_[f];
      out += fr.node->is_object() ? pointer_token(fr.key) : std::to_string(fr.node->size() - 1);
    }
    return out.empty() ? std::string("/") : out;
  }

  const std::string& what_;
  const std::string& top_level_key_noun_;
  json root_;
  std::vector<Frame> frames_;
};

}  // namespace

namespace detail {

std::string quote_name(std::string_view s) {
  constexpr std::size_t kMax = 256;
  std::string out = "\"";
  for (std::size_t i = 0; i < s.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMax) out += "...";
  out += "\"";
  return out;
}

std::string short_json(const nlohmann::json& v) {
  constexpr std::size_t kMax = 60;
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() <= kMax) return s;
  std::size_t cut = kMax;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0u) == 0x80u) --cut;
  return s.substr(0, cut) + "...";
}

std::string bounded_message(std::string_view message, std::size_t max) {
  std::string out;
  std::size_t i = 0;
  for (; i < message.size() && out.size() < max; ++i) {
    const auto c = static_cast<unsigned char>(message[i]);
    if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7F) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xF];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (i < message.size()) {
    while (i > 0 && i < message.size() && (static_cast<unsigned char>(message[i]) & 0xC0u) == 0x80u) {
      out.pop_back();  // do not end inside a UTF-8 sequence
      --i;
    }
    out += "... (" + std::to_string(message.size() - i) + " more bytes)";
  }
  return out;
}

}  // namespace detail

nlohmann::json parse_json_strict(std::string_view text, const std::string& what,
                                 const std::string& top_level_key_noun) {
  validate_utf8(text, what);
  StrictBuilder builder(what, top_level_key_noun);
  try {
    nlohmann::json::sax_parse(text.begin(), text.end(), &builder, nlohmann::json::input_format_t::json,
                              /*strict=*/true, /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    fail(what, std::string("not valid JSON (") + e.what() + ")");
  }
  return builder.take();
}

nlohmann::json parse_json_strict(std::string_view text, const std::string& what) {
  return parse_json_strict(text, what, "key");
}

}  // namespace ddim::format
