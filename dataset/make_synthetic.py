"""Write a small synthetic action dataset as real videos in UCF101's layout.

    python dataset/make_synthetic.py --out demo_data --preset motion
writes demo_data/ucf101/v_<Class>_gXX_cYY.avi and demo_data/ucfTrainTestlist/{classInd,trainlist01,
testlist01}.txt, ready for `extract_videos.py -d ucf101 --root demo_data`.

Presets `motion` and `shapes`: each video shows one shape on a textured, noisy background.
Classes differ only in how the shape moves: shape, colour, size and position are drawn from the
same distribution for every class (static parameters of a class are spread like the moving ones
over a clip), so one frame does not tell the class, and no class is the mirror image of another,
so random flips keep labels.
Preset `camera` (the demo's): the camera pans up or down, zooms in or out, or stays still over a
textured scene with a few shapes; the whole frame moves, so even a small network at 16x16 pixels
learns it quickly, and again neither one frame nor a horizontal flip gives the class away.
Preset `handheld` films such scenes with other camera motions: sway, tilt, breathe (zoom in and
out), roll (either way) and jitter.
"""

import argparse
import math
from pathlib import Path

import av
import numpy as np
from PIL import Image

PRESETS = {
    # translation and scale
    "motion": ("MoveUp", "MoveDown", "Expand", "Shrink", "Hold"),
    # periodic and rotational dynamics
    "shapes": ("Pulse", "Flicker", "Shake", "Orbit", "Spin"),
    # camera motion over a textured scene: every pixel carries the class (the demo's set)
    "camera": ("PanUp", "PanDown", "ZoomIn", "ZoomOut", "Still"),
    # the same scenes filmed by a restless hand: a second set with other classes
    "handheld": ("Sway", "Tilt", "Breathe", "Roll", "Jitter"),
}
ALL_SHAPES = ("circle", "square", "triangle", "bar")
SHAPES = {"motion": ALL_SHAPES, "shapes": ("square", "triangle", "bar"), "camera": ALL_SHAPES, "handheld": ALL_SHAPES}
CAMERA_PRESETS = ("camera", "handheld")
SCENE_SCALE = 6  # the camera presets film a scene six times the frame's size: no edge comes into view
CLIPS_PER_GROUP = 4  # as UCF101: clips of one group share a background and never straddle train/test
NOISE_STD = 5.0


def _background(rng: np.random.Generator, height: int, width: int, contrast: float = 18.0, cell: int = 8) -> np.ndarray:
    """A smooth random texture (blobs about `cell` pixels wide) around a random grey-ish colour: H x W x 3 float."""
    base = rng.uniform(70, 180, size=3)
    coarse = rng.normal(0, 1, size=(max(2, height // cell), max(2, width // cell), 3))
    layers = [
        np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize((width, height), Image.BICUBIC))
        for c in range(3)
    ]
    return base + contrast * np.stack(layers, axis=-1)


def _trajectory(name: str, rng: np.random.Generator, frames: int, height: int, width: int) -> dict:
    """Per-frame centre, size, angle and contrast (arrays of length `frames`) for one video of class `name`.

    Every preset's dynamics are drawn for every video; the class animates its own and freezes the
    others at a random point of their sweep or cycle, so one frame looks alike in every class.
    """
    side = min(height, width)
    t = np.arange(frames, dtype=np.float64)
    tau = (t - (frames - 1) / 2) / frames  # -0.5 .. 0.5 over the clip

    def sweep(active: bool) -> np.ndarray:
        return tau if active else np.full(frames, rng.uniform(-0.5, 0.5))

    def cycle(active: bool, periods: tuple[float, float]) -> np.ndarray:
        phase = rng.uniform(0, 2 * math.pi)
        return 2 * math.pi * t / rng.uniform(*periods) + phase if active else np.full(frames, phase)

    cx = np.full(frames, rng.uniform(0.35, 0.65) * width)
    cy = np.full(frames, rng.uniform(0.35, 0.65) * height)
    size = np.full(frames, rng.uniform(0.12, 0.18) * side)
    angle = np.full(frames, rng.uniform(0, 2 * math.pi))
    contrast = np.ones(frames)
    if name in PRESETS["motion"]:
        direction = -1 if name in ("MoveUp", "Shrink") else 1
        cy += rng.uniform(0.3, 0.45) * height * direction * sweep(name in ("MoveUp", "MoveDown"))
        size *= np.exp(rng.uniform(0.8, 1.2) * direction * sweep(name in ("Expand", "Shrink")))
    elif name in PRESETS["shapes"]:
        direction = rng.choice([-1, 1])  # Orbit and Spin turn either way: a flip swaps the two
        size *= 1 + rng.uniform(0.25, 0.4) * np.sin(cycle(name == "Pulse", (8, 12)))
        contrast -= rng.uniform(0.3, 0.45) * (1 + np.sin(cycle(name == "Flicker", (6, 10)))) / 2
        cx += rng.uniform(0.06, 0.1) * width * np.sin(cycle(name == "Shake", (5, 7)))
        turn = direction * cycle(name == "Orbit", (16, 28))
        radius = rng.uniform(0.1, 0.15) * side
        cx += radius * np.cos(turn)
        cy += radius * np.sin(turn)
        if name == "Spin":  # a frozen spin is just the random angle drawn above
            angle += direction * rng.uniform(math.pi / 16, math.pi / 9) * t
    else:
        raise ValueError(f"unknown class {name!r}")
    return {"cx": cx, "cy": cy, "size": size, "angle": angle, "contrast": contrast}


def _coverage(shape: str, motion: dict, height: int, width: int) -> np.ndarray:
    """Anti-aliased shape coverage in [0, 1] for every frame: T x H x W, from a signed distance."""
    cx, cy, angle, size = (motion[key][:, None, None] for key in ("cx", "cy", "angle", "size"))  # (T, 1, 1)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    cos, sin = np.cos(angle), np.sin(angle)
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    if shape == "circle":
        distance = size - np.hypot(dx, dy)
    elif shape == "square":
        distance = 0.9 * size - np.maximum(np.abs(along), np.abs(across))
    elif shape == "bar":
        distance = np.minimum(1.4 * size - np.abs(along), 0.6 * size - np.abs(across))
    else:  # equilateral triangle, circumradius 1.3 * size: inside all three edges
        edges = [
            0.65 * size - (along * math.cos(a) + across * math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)
        ]
        distance = np.minimum(np.minimum(edges[0], edges[1]), edges[2])
    return np.clip(distance + 0.5, 0.0, 1.0)


def _camera_path(name: str, rng: np.random.Generator, frames: int, height: int, width: int) -> dict:
    """Per-frame camera offset (dx, dy, in frame pixels), zoom (scene pixels per frame pixel) and
    roll angle for one video of a camera class.

    As for the object presets, every dynamic of both camera presets is drawn for every video; the
    class animates its own and freezes the others at a random point of their sweep or cycle, so
    one frame (its offset, zoom or roll) looks alike in every class.
    """
    if name not in PRESETS["camera"] + PRESETS["handheld"]:
        raise ValueError(f"unknown class {name!r}")
    t = np.arange(frames, dtype=np.float64)
    tau = (t - (frames - 1) / 2) / frames                  # -0.5 .. 0.5 over the clip
    speed = rng.uniform(0.8, 1.2)

    def sweep(active: bool) -> np.ndarray:
        return tau if active else np.full(frames, rng.uniform(-0.5, 0.5))

    def wave(active: bool) -> np.ndarray:
        phase = rng.uniform(0, 2 * math.pi)
        return np.sin(2 * math.pi * t / rng.uniform(12, 20) + phase) if active else np.full(frames, math.sin(phase))

    sign = rng.choice([-1, 1])
    dx = rng.uniform(-0.05, 0.05) * width + 0.25 * width * speed * wave(name == "Sway")
    dy = rng.uniform(-0.05, 0.05) * height + 0.25 * height * speed * wave(name == "Tilt")
    pan = sweep(name in ("PanUp", "PanDown"))                # about 2 frame heights over the clip
    dy = dy + (-1 if name == "PanUp" else 1) * 2.0 * height * speed * pan
    zoom = rng.uniform(0.8, 1.0) * np.exp((-1 if name == "ZoomIn" else 1) * 1.4 * speed
                                          * sweep(name in ("ZoomIn", "ZoomOut")))
    zoom = zoom * np.exp(0.3 * speed * wave(name == "Breathe"))
    # Roll turns either way round, so a flip keeps the class.
    angle = sign * rng.uniform(math.pi / 48, math.pi / 32) * speed * (sweep(name == "Roll") + 0.5) * frames
    shake = rng.normal(0, 1, (2, frames)) if name == "Jitter" else rng.normal(0, 1, (2, 1))
    dx, dy = dx + 0.05 * width * shake[0], dy + 0.05 * height * shake[1]   # a shaky hand: a jump every frame
    return {"dx": dx, "dy": dy, "zoom": zoom, "angle": angle}


def render_camera(name: str, rng: np.random.Generator, scene: np.ndarray, frames: int) -> np.ndarray:
    """A camera moving over `scene` (SCENE_SCALE times the frame size) with a few shapes painted on it, as the
    class says: T x H x W x 3 uint8. One frame shows a textured scene whatever the class; only
    the motion between frames tells it."""
    height, width = scene.shape[0] // SCENE_SCALE, scene.shape[1] // SCENE_SCALE
    scene = scene.copy()
    for _ in range(int(rng.integers(12, 21))):           # shapes give the scene edges to follow
        blob = {"cx": np.array([rng.uniform(0.1, 0.9) * scene.shape[1]]),
                "cy": np.array([rng.uniform(0.1, 0.9) * scene.shape[0]]),
                "size": np.array([rng.uniform(0.1, 0.2) * min(height, width)]),
                "angle": np.array([rng.uniform(0, 2 * math.pi)])}
        alpha = _coverage(ALL_SHAPES[rng.integers(len(ALL_SHAPES))], blob, *scene.shape[:2])[0][..., None]
        colour = np.clip(scene.mean(axis=(0, 1)) + rng.choice([-1, 1], size=3) * rng.uniform(50, 100, 3), 0, 255)
        scene = scene * (1 - alpha) + colour * alpha
    image = Image.fromarray(np.clip(scene, 0, 255).round().astype(np.uint8))
    path = _camera_path(name, rng, frames, height, width)
    cx, cy = scene.shape[1] / 2 + path["dx"], scene.shape[0] / 2 + path["dy"]
    video = np.empty((frames, height, width, 3), np.float64)
    for t in range(frames):
        # frame pixel (x, y) shows scene pixel centre + zoom * rotation * (x - w/2, y - h/2)
        z, c, s = path["zoom"][t], math.cos(path["angle"][t]), math.sin(path["angle"][t])
        a, b, d, e = z * c, -z * s, z * s, z * c
        data = (a, b, cx[t] - a * width / 2 - b * height / 2, d, e, cy[t] - d * width / 2 - e * height / 2)
        video[t] = np.asarray(image.transform((width, height), Image.AFFINE, data, resample=Image.BILINEAR))
    video += rng.normal(0, NOISE_STD, size=video.shape)
    return np.clip(video, 0, 255).round().astype(np.uint8)


def render_video(preset: str, name: str, rng: np.random.Generator, background: np.ndarray, frames: int) -> np.ndarray:
    """Frames of one video of class `name`: T x H x W x 3 uint8."""
    if preset in CAMERA_PRESETS:
        return render_camera(name, rng, background, frames)
    height, width = background.shape[:2]
    motion = _trajectory(name, rng, frames, height, width)
    shape = SHAPES[preset][rng.integers(len(SHAPES[preset]))]
    # The shape's colour stands out from the background by 60-120 levels in each channel, either way.
    colour = background.mean(axis=(0, 1)) + rng.choice([-1, 1], size=3) * rng.uniform(60, 120, size=3)
    alpha = (_coverage(shape, motion, height, width) * motion["contrast"][:, None, None])[..., None]
    video = background * (1 - alpha) + np.clip(colour, 0, 255) * alpha
    video += rng.normal(0, NOISE_STD, size=video.shape)
    return np.clip(video, 0, 255).round().astype(np.uint8)


def write_video(path: Path, video: np.ndarray, fps: int = 25) -> None:
    """Encode T x H x W x 3 uint8 frames as MPEG-4 Part 2 in AVI (UCF101's codec family) with PyAV."""
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless at these sizes
        stream.codec_context.thread_count = 1  # single-threaded encoding gives the same bytes every run
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def make_dataset(
    out, preset: str = "motion", videos_per_class: int = 16, test_per_class: int = 6, frames: int = 32,
    height: int = 48, width: int = 64, seed: int = 0, fps: int = 25,
) -> list[str]:
    """Write the dataset under `out` (UCF101 layout, split 1); returns the class names in label order."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even for the video encoder, got {height}x{width}")
    out = Path(out)
    video_dir, list_dir = out / "ucf101", out / "ucfTrainTestlist"
    video_dir.mkdir(parents=True, exist_ok=True)
    list_dir.mkdir(parents=True, exist_ok=True)
    classes = PRESETS[preset]
    preset_id = sorted(PRESETS).index(preset)
    train_groups = math.ceil(videos_per_class / CLIPS_PER_GROUP)
    lists = {"train": [], "test": []}
    for label, name in enumerate(classes):
        backgrounds = {}
        for index in range(videos_per_class + test_per_class):
            subset = "train" if index < videos_per_class else "test"
            k = index if subset == "train" else index - videos_per_class
            group = 1 + k // CLIPS_PER_GROUP + (0 if subset == "train" else train_groups)
            rng = np.random.default_rng([seed, preset_id, label, group, 1 + index])
            if preset in CAMERA_PRESETS:
                # A strongly textured scene of its own per video: a scene shared by a group of one
                # class would let a network tell the class by the scene instead of the motion.
                background = _background(rng, height * SCENE_SCALE, width * SCENE_SCALE, 50.0, 12)
            else:
                if group not in backgrounds:
                    backgrounds[group] = _background(np.random.default_rng([seed, preset_id, label, group, 0]),
                                                     height, width)
                background = backgrounds[group]
            file_name = f"v_{name}_g{group:02d}_c{k % CLIPS_PER_GROUP + 1:02d}.avi"
            write_video(video_dir / file_name, render_video(preset, name, rng, background, frames), fps)
            lists[subset].append(f"{name}/{file_name}" + (f" {label + 1}" if subset == "train" else ""))
    (list_dir / "classInd.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(classes)))
    (list_dir / "trainlist01.txt").write_text("".join(line + "\n" for line in lists["train"]))
    (list_dir / "testlist01.txt").write_text("".join(line + "\n" for line in lists["test"]))
    return list(classes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write ucf101/ and ucfTrainTestlist/ into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="motion", help="class set: " + "; ".join(
        f"{p}: {', '.join(c)}" for p, c in PRESETS.items()))
    parser.add_argument("--videos-per-class", type=int, default=16, help="training videos per class (default 16)")
    parser.add_argument("--test-per-class", type=int, default=6, help="test videos per class (default 6)")
    parser.add_argument("--frames", type=int, default=32, help="frames per video (default 32)")
    parser.add_argument("--height", type=int, default=48, help="frame height, even (default 48)")
    parser.add_argument("--width", type=int, default=64, help="frame width, even (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same videos (default 0)")
    args = parser.parse_args(argv)
    classes = make_dataset(
        args.out, args.preset, args.videos_per_class, args.test_per_class, args.frames, args.height, args.width,
        args.seed,
    )
    total = len(classes) * (args.videos_per_class + args.test_per_class)
    print(f"wrote {total} videos of {len(classes)} classes ({', '.join(classes)}) under {args.out}")


if __name__ == "__main__":
    main()
