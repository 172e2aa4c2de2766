#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/ from the committed test fixtures (plus a few hand-made
inputs).  Seeds are the starting corpus of every target; `tools/fuzz.sh` passes them to
libFuzzer beside the growing (uncommitted) corpus in fuzz/corpus/.  Rerun after a
fixture changes: python3 fuzz/make_seeds.py"""
import glob
import json
import os
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(ROOT, "fuzz", "seeds")
SEP = b"\n#-#-#\n"  # popen_fuzz::SEP


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(*p):
    with open(os.path.join(FX, *p), "rb") as f:
        return f.read()


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    for m in ["llama", "llama_bf16", "bert", "clip_vision_model", "llava"]:
        put("safetensors", f"{m}_inputs", read("golden", m, "inputs.safetensors"))
        put("hf_config", m, read("golden", m, "config.json"))
    put("safetensors", "llama_outputs", read("golden", "llama", "outputs.safetensors"))

    put("muse", "muse", read("readers", "muse", "muse.json"))
    for p in sorted(glob.glob(os.path.join(FX, "readers", "muse", "bad", "*.json"))):
        put("muse", "bad_" + os.path.basename(p)[:-5], open(p, "rb").read())
    put("grandf", "grandf", read("readers", "grandf", "grandf.json"))
    for n in ["img_a", "img_b"]:
        put("reasonseg", n, read("readers", "reasonseg", "val", n + ".json"))
    for ds, by in [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")]:
        refs = read("readers", "refcoco", ds, f"refs({by}).p")
        put("pickle", ds, refs)
        put("refcoco", ds, refs + SEP + read("readers", "refcoco", ds, "instances.json"))

    coco = json.loads(read("coco", "coco_rle.json"))
    for k, m in enumerate(coco["masks"][:12]):
        h, w = m["size"] if "size" in m else (m["h"], m["w"])
        counts = m.get("counts") or m.get("rle")
        if isinstance(counts, str):
            put("rle", f"compressed_{k}", struct.pack("<HHB", h, w, 0) + counts.encode())
    for k, p in enumerate(coco["polygons"][:8]):
        xy = [v for ring in p["polys"] for v in ring]
        put("polygon", f"coco_{k}", bytes([p["h"], p["w"], 1]) + struct.pack(f"<{len(xy)}d", *xy))
    square = [8, 8, 40, 8, 40, 40, 8, 40]  # i16 / 8 -> (1,1) (5,1) (5,5) (1,5)
    put("polygon", "square", bytes([16, 16, 0]) + struct.pack(f"<{len(square)}h", *square))
    put("rle", "runs_4x4", struct.pack("<HHB", 4, 4, 1) + struct.pack("<3I", 5, 6, 5))

    for p in sorted(glob.glob(os.path.join(FX, "readers", "*", "images", "**", "*.png"), recursive=True))[:2]:
        put("png_mask", os.path.basename(p), open(p, "rb").read())
    for n in ["broken.png", "small.png"]:
        put("png_mask", n, read("readers", "muse", "bad", n))

    put("run_config", "stage1_world", open(os.path.join(ROOT, "tools", "configs", "stage1_world.toml"), "rb").read())
    put("run_config", "stage3", b"prompt_len = 10\nlti = false\n[train]\nlr = 1e-3\ntotal_steps = 60\n[ensemble]\nk = 3\ntau = \"both\"\n")
    put("run_config", "stage2", b"[train]\nmicro_batch = 8\n[loss]\nnll = 1.0\n[collect]\nresamples = 3\n")
    # run_dir: the first byte picks the file the rest replaces (see the target)
    put("run_dir", "config", b"\x00" + read("run", "config.json"))
    put("run_dir", "tokenizer", b"\x01" + read("run", "tokenizer.json"))
    put("run_dir", "weights", b"\x02" + read("golden", "llava", "inputs.safetensors"))
    put("run_dir", "train_state", b"\x03" + read("run", "train_state.json"))
    put("run_dir", "moments", b"\x04" + read("golden", "llama", "inputs.safetensors"))
    put("eval_data", "eval_fixture", read("eval", "data.json"))
    put("eval_data", "muse", read("readers", "muse", "muse.json"))
    lines = read("eval", "pred.jsonl").splitlines(keepends=True)
    put("pred_jsonl", "first_8", b"".join(lines[:8]))
    put("pred_jsonl", "last_8", b"".join(lines[-8:]))
    put("chair_vocab", "fixture", read("eval", "vocab.txt") + SEP + b"A cup, two mugs and a teddy bear on the plates.")

    for k, t in enumerate([
        "You could eat the two apples <seg> <seg> and the banana <seg>, rich in vitamins.",
        "a <seg> b<seg>.",
        "<seg><seg> <<seg>> \u00e9t\u00e9 \u2581 \u4e2d\u6587 \U0001f600",
    ]):
        put("tokenizer_world", f"text_{k}", t.encode())
        put("tokenizer_hf", f"text_{k}", t.encode())


if __name__ == "__main__":
    main()
