"""An FFCV random-resized-crop (+ flip) decoder whose draws are reproducible.

FFCV's own RandomResizedCrop and RandomHorizontalFlip draw from numba's unseeded per-thread
generators, so two runs with the same seed see different crops and a resumed run does not
continue the interrupted one. Here every sample seeds the generator of the thread decoding it
from (run seed, epoch, sample index) only: the same crop whatever batch, rank or thread decodes
it. The epoch is read at run time from the stream's ``RuntimeInt`` (numba freezes what a
kernel captures, so a captured epoch would need a recompile every epoch).
"""

from __future__ import annotations

import numpy as np


def seeded_rrc_decoder(size: int, scale, ratio=(3 / 4, 4 / 3), flip: bool = True, seed: int = 0, epoch=None):
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    from .ffcv_runtime import RuntimeInt, read_int

    epoch = epoch if epoch is not None else RuntimeInt()

    class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            read = self.memory_read
            loop = Compiler.get_iterator()
            decode_jpeg = Compiler.compile(imdecode)
            crop_resize = Compiler.compile(resize_crop)
            draw_crop = Compiler.compile(get_random_crop)
            sc, rt = np.array(self.scale, dtype=np.float64), np.array(self.ratio, dtype=np.float64)
            seed_part = np.uint64((seed % (2**31)) * 1000003 + 17)
            at = self.epoch.address
            do_flip = flip

            def decode(batch_indices, my_storage, metadata, storage_state):
                base = (seed_part + np.uint64(read_int(at)) * np.uint64(7919)) % np.uint64(2**31 - 1)
                out, scratch = my_storage
                n = len(batch_indices)
                for k in loop(n):
                    ix = batch_indices[k]
                    mix = (base * np.uint64(1000003) + np.uint64(ix) * np.uint64(104729)) % np.uint64(2**31 - 1)
                    np.random.seed(np.int64(mix))
                    rec = metadata[ix]
                    raw = read(rec["data_ptr"], storage_state)
                    h, w = np.uint32(rec["height"]), np.uint32(rec["width"])
                    if rec["mode"] == jpg:
                        buf = scratch[k]
                        decode_jpeg(raw, buf, h, w, h, w, 0, 0, 1, 1, False, False)
                        img = buf.reshape(-1)[: 3 * h * w].reshape(h, w, 3)
                    else:
                        img = raw.reshape(h, w, 3)
                    top, left, ch, cw = draw_crop(h, w, sc, rt)
                    crop_resize(img, top, top + ch, left, left + cw, out[k])
                    if do_flip and np.random.random() < 0.5:
                        row = out[k]
                        width = row.shape[1]
                        for x in range(width // 2):
                            for y in range(row.shape[0]):
                                for c in range(3):
                                    a = row[y, x, c]
                                    row[y, x, c] = row[y, width - 1 - x, c]
                                    row[y, width - 1 - x, c] = a
                return out[:n]

            decode.is_parallel = True
            return decode

    decoder = SeededRandomResizedCrop((size, size), scale=tuple(scale), ratio=tuple(ratio))
    decoder.epoch = epoch
    return decoder
