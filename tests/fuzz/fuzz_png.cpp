// fuzz_png: the ddim tool's PNG decoder (signature, chunk CRCs, IHDR, zlib inflate, the five row
// filters) and the image-to-tensor conversion for 1- and 3-channel models.
#include "fuzz_common.hpp"
#include "png.hpp"

int ddim::fuzz::run_one(std::span<const std::uint8_t> data) {
  expect_only_ddim_errors("fuzz_png", [&] {
    const ddim::tools::DecodedPng png = ddim::tools::decode_png(data, "fuzz.png");
    for (int channels : {1, 3})
      expect_only_ddim_errors("fuzz_png", [&] { (void)ddim::tools::image_to_tensor(png.image, channels, "fuzz.png"); });
  });
  return 0;
}
