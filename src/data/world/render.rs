//! Placing objects in a scene and rasterizing it: textured background, objects in
//! depth order (later covers earlier), global lighting and colour jitter.  The instance
//! masks come from the same pass (an id per pixel), so each mask is exactly the visible
//! pixels of its object after occlusion.
use super::categories::CATEGORIES;
use super::designs::{on_wall, parts, pose_range};
use super::rng::{pixel_noise, value_noise, Rng};
use super::scenes::SCENES;
use super::shapes::Part;

/// Smallest visible area (pixels) an object may keep.
pub const MIN_VISIBLE_PX: usize = 12;
/// Smallest fraction of its own area an object keeps visible when others cover it.
pub const MIN_VISIBLE_FRACTION: f32 = 0.5;
/// Placement attempts per instance before it is left out.
const PLACE_TRIES: usize = 30;

/// An 8-bit RGB image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    /// Rows, in pixels.
    pub height: usize,
    /// Columns, in pixels.
    pub width: usize,
    /// height × width × 3
    pub data: Vec<u8>,
}

impl RgbImage {
    /// An all-black image.
    pub fn new(height: usize, width: usize) -> Self {
        RgbImage {
            height,
            width,
            data: vec![0; height * width * 3],
        }
    }
    /// The `[r, g, b]` pixel at row `y`, column `x` (panics out of bounds).
    pub fn get(&self, y: usize, x: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
    /// Sets the pixel at row `y`, column `x` to `[r, g, b]` (panics out of bounds).
    pub fn set(&mut self, y: usize, x: usize, c: [u8; 3]) {
        let i = (y * self.width + x) * 3;
        self.data[i..i + 3].copy_from_slice(&c);
    }
}

/// One placed instance: category, colour, pose.
#[derive(Clone, Debug)]
pub struct Placed {
    /// Category id into [`CATEGORIES`].
    pub category: usize,
    /// Index into the category's `colours`.
    pub colour: usize,
    /// Centre in pixels.
    pub cx: f32,
    /// Centre's row coordinate, in pixels.
    pub cy: f32,
    /// Pixels per local unit.
    pub scale: f32,
    /// Rotation in radians, within the category's pose range.
    pub rot: f32,
    /// Whether the shape is flipped left-right (local x negated) before rotation.
    pub mirror: bool,
    /// Per-instance colour jitter (multiplicative per channel).
    pub jitter: [f32; 3],
}

/// Global lighting of a scene.
#[derive(Clone, Debug)]
pub struct Lighting {
    /// Luminance multiplier for the whole image (drawn in 0.8..1.12).
    pub brightness: f32,
    /// Per-channel RGB multiplier (each drawn in 0.92..1.08).
    pub tint: [f32; 3],
    /// Direction of the luminance gradient across the image (a unit vector).
    pub dir: (f32, f32),
    /// Luminance gradient strength along `dir`, relative to the diagonal (0..0.25).
    pub gradient: f32,
    /// Seed of the per-pixel grain noise.
    pub noise_seed: u64,
    /// Per-pixel noise amplitude in 0..255 units.
    pub grain: f32,
}

/// Everything needed to draw a scene again: background, objects in depth order, light.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Scene type id into [`SCENES`] (wall, floor, horizon).
    pub scene: usize,
    /// Seed of the background's texture noise.
    pub bg_seed: u64,
    /// Placed instances in depth order (back to front; later covers earlier).
    pub objects: Vec<Placed>,
    /// The scene's global lighting.
    pub light: Lighting,
}

impl Placed {
    fn parts(&self) -> Vec<Part> {
        let cat = &CATEGORIES[self.category];
        let base = cat.colours[self.colour].rgb;
        let rgb = [
            base[0] as f32 * self.jitter[0],
            base[1] as f32 * self.jitter[1],
            base[2] as f32 * self.jitter[2],
        ];
        parts(cat.name, rgb)
    }
    /// Pixel rectangle `(x0, y0, x1, y1)` (exclusive ends, clipped) that can hold the object.
    fn pixel_bounds(&self, parts: &[Part], h: usize, w: usize) -> (usize, usize, usize, usize) {
        let (hx, hy) = half_extent(parts, self.rot);
        let x0 = (self.cx - hx * self.scale).floor().max(0.0) as usize;
        let y0 = (self.cy - hy * self.scale).floor().max(0.0) as usize;
        let x1 = ((self.cx + hx * self.scale).ceil() + 1.0).clamp(0.0, w as f32) as usize;
        let y1 = ((self.cy + hy * self.scale).ceil() + 1.0).clamp(0.0, h as f32) as usize;
        (x0, y0, x1.max(x0), y1.max(y0))
    }
    /// Calls `f(y, x, colour)` for every pixel the object covers; with `paint` false
    /// the colour is not computed (placement only needs coverage, and the texture
    /// noise is most of the cost).
    fn raster(&self, h: usize, w: usize, paint: bool, mut f: impl FnMut(usize, usize, [f32; 3])) {
        let parts = self.parts();
        let (x0, y0, x1, y1) = self.pixel_bounds(&parts, h, w);
        let (s, c) = (-self.rot).sin_cos();
        let noise_seed = (self.category as u64) << 32 | (self.cx.to_bits() as u64);
        for y in y0..y1 {
            for x in x0..x1 {
                let (dx, dy) = (
                    (x as f32 + 0.5 - self.cx) / self.scale,
                    (y as f32 + 0.5 - self.cy) / self.scale,
                );
                let (mut u, v) = (dx * c - dy * s, dx * s + dy * c);
                if self.mirror {
                    u = -u;
                }
                if let Some(part) = parts.iter().rev().find(|p| p.shape.contains(u, v)) {
                    if !paint {
                        f(y, x, [0.0; 3]);
                        continue;
                    }
                    let nz = value_noise(noise_seed, x as f32, y as f32, 3.0);
                    let f_tex = part.tex.factor(u, v, nz);
                    // Light from the top-left of the object: a soft volume cue.
                    let shade = 1.0 - 0.18 * v - 0.06 * u;
                    let k = f_tex * shade;
                    f(y, x, [part.rgb[0] * k, part.rgb[1] * k, part.rgb[2] * k]);
                }
            }
        }
    }
}

/// Half extents (local units) of the parts' box after rotation by `rot`.
fn half_extent(parts: &[Part], rot: f32) -> (f32, f32) {
    let (mut hx, mut hy) = (0.0f32, 0.0f32);
    let (s, c) = rot.sin_cos();
    for p in parts {
        let (x0, y0, x1, y1) = p.shape.bounds();
        for (x, y) in [(x0, y0), (x1, y0), (x0, y1), (x1, y1)] {
            // Mirroring flips x, so take both signs.
            for sx in [x, -x] {
                hx = hx.max((sx * c - y * s).abs());
                hy = hy.max((sx * s + y * c).abs());
            }
        }
    }
    (hx, hy)
}

/// Places the instances `want` (category ids, one entry per instance) into a scene
/// of type `scene`, largest first so small things lie on top of furniture.  An
/// instance that cannot be placed without hiding more than half of another (or itself
/// being too small) is left out.  Returns the layout with objects in depth order.
pub fn place(scene: usize, want: &[usize], h: usize, w: usize, rng: &mut Rng) -> Layout {
    let kind = &SCENES[scene];
    let mut order: Vec<usize> = want.to_vec();
    // Stable sort by size, descending; ties keep the draw order.
    order.sort_by(|a, b| CATEGORIES[*b].size.total_cmp(&CATEGORIES[*a].size));
    let mut ids = vec![0u16; h * w];
    let mut full_area: Vec<usize> = Vec::new();
    let mut visible: Vec<usize> = Vec::new();
    let mut placed: Vec<Placed> = Vec::new();
    let min_side = h.min(w) as f32;
    let horizon = kind.horizon * h as f32;
    for &cat_id in &order {
        let cat = &CATEGORIES[cat_id];
        let colour = rng.below(cat.colours.len());
        let (rot_range, can_mirror) = pose_range(cat.name);
        let jitter = [
            rng.range(0.9, 1.1),
            rng.range(0.9, 1.1),
            rng.range(0.9, 1.1),
        ];
        for _ in 0..PLACE_TRIES {
            let scale = cat.size * min_side * rng.range(0.85, 1.15);
            let rot = rng.range(-rot_range, rot_range);
            let mirror = can_mirror && rng.chance(0.5);
            let probe = Placed {
                category: cat_id,
                colour,
                cx: 0.0,
                cy: 0.0,
                scale,
                rot,
                mirror,
                jitter,
            };
            let (hx, hy) = half_extent(&probe.parts(), rot);
            let (hx, hy) = (hx * scale, hy * scale);
            if 2.0 * hx >= w as f32 || 2.0 * hy >= h as f32 {
                continue;
            }
            let cx = rng.range(hx, w as f32 - hx);
            // Things stand on the floor/table (bottom below the horizon); clocks hang.
            let (lo, hi) = if on_wall(cat.name) {
                (hy, (horizon - hy * 0.2).max(hy + 1.0))
            } else {
                ((horizon - hy * 0.4).max(hy), h as f32 - hy)
            };
            let cy = rng.range(lo, hi.max(lo + 0.5).min(h as f32 - hy));
            let cand = Placed { cx, cy, ..probe };
            // Pixels the candidate would cover, and how much of each placed object it hides.
            let mut cover = Vec::new();
            cand.raster(h, w, false, |y, x, _| cover.push(y * w + x));
            if cover.len() < MIN_VISIBLE_PX {
                continue;
            }
            let mut lost = vec![0usize; placed.len()];
            for &i in &cover {
                if ids[i] > 0 {
                    lost[ids[i] as usize - 1] += 1;
                }
            }
            let ok = (0..placed.len()).all(|k| {
                let left = visible[k] - lost[k];
                left >= MIN_VISIBLE_PX && left as f32 >= MIN_VISIBLE_FRACTION * full_area[k] as f32
            });
            if !ok {
                continue;
            }
            let id = placed.len() as u16 + 1;
            for (k, l) in lost.iter().enumerate() {
                visible[k] -= l;
            }
            for &i in &cover {
                ids[i] = id;
            }
            full_area.push(cover.len());
            visible.push(cover.len());
            placed.push(cand);
            break;
        }
    }
    let light = Lighting {
        brightness: rng.range(0.8, 1.12),
        tint: [
            rng.range(0.92, 1.08),
            rng.range(0.92, 1.08),
            rng.range(0.92, 1.08),
        ],
        dir: {
            let a = rng.range(0.0, std::f32::consts::TAU);
            (a.cos(), a.sin())
        },
        gradient: rng.range(0.0, 0.25),
        noise_seed: rng.next_u64(),
        grain: rng.range(2.0, 7.0),
    };
    Layout {
        height: h,
        width: w,
        scene,
        bg_seed: rng.next_u64(),
        objects: placed,
        light,
    }
}

/// Background colour (before lighting) at a pixel.
fn background(l: &Layout, y: usize, x: usize) -> [f32; 3] {
    let kind = &SCENES[l.scene];
    let horizon = (kind.horizon * l.height as f32) as usize;
    let (xf, yf) = (x as f32, y as f32);
    if y < horizon {
        let n = value_noise(l.bg_seed, xf, yf, 12.0);
        let f = 0.94 + 0.1 * n;
        return kind.wall.map(|c| c as f32 * f);
    }
    if y < horizon + 2 {
        // A dark skirting line where wall meets floor or table edge.
        return kind.floor.map(|c| c as f32 * 0.55);
    }
    let f = match kind.floor_tex {
        0 => {
            let warp = 6.0 * value_noise(l.bg_seed ^ 1, xf, yf, 20.0);
            let grain = ((yf + warp) * std::f32::consts::TAU / 5.0).sin();
            0.95 + 0.09 * grain + 0.06 * value_noise(l.bg_seed ^ 2, xf, yf, 4.0)
        }
        1 => {
            0.85 + 0.2 * value_noise(l.bg_seed ^ 3, xf, yf, 3.0)
                + 0.08 * pixel_noise(l.bg_seed, x, y)
        }
        _ => {
            let tile = 14;
            if x.is_multiple_of(tile) || (y - horizon).is_multiple_of(tile) {
                0.75
            } else {
                0.97 + 0.05 * value_noise(l.bg_seed ^ 4, xf, yf, 6.0)
            }
        }
    };
    kind.floor.map(|c| c as f32 * f)
}

/// Draws the layout.  Returns the image and the per-pixel object id (0 background,
/// k+1 for `objects[k]`).  With `with_objects` false only the background is drawn
/// (under the same lighting), which tests use to check the masks.
pub fn render(l: &Layout, with_objects: bool) -> (RgbImage, Vec<u16>) {
    let (h, w) = (l.height, l.width);
    let mut rgb: Vec<[f32; 3]> = (0..h * w).map(|i| background(l, i / w, i % w)).collect();
    let mut ids = vec![0u16; h * w];
    if with_objects {
        for (k, o) in l.objects.iter().enumerate() {
            o.raster(h, w, true, |y, x, c| {
                rgb[y * w + x] = c;
                ids[y * w + x] = k as u16 + 1;
            });
        }
    }
    let mut img = RgbImage::new(h, w);
    let lt = &l.light;
    let diag = ((h * h + w * w) as f32).sqrt();
    for y in 0..h {
        for x in 0..w {
            let proj = ((x as f32 - w as f32 / 2.0) * lt.dir.0
                + (y as f32 - h as f32 / 2.0) * lt.dir.1)
                / diag;
            let lum = lt.brightness * (1.0 + lt.gradient * proj);
            let g = lt.grain * (pixel_noise(lt.noise_seed, x, y) - 0.5);
            let c = rgb[y * w + x];
            let px =
                [0, 1, 2].map(|ch| (c[ch] * lum * lt.tint[ch] + g).round().clamp(0.0, 255.0) as u8);
            img.set(y, x, px);
        }
    }
    (img, ids)
}
