//! Shape primitives in an object's local frame (unit = the object's nominal size,
//! x right, y down, origin at the object's centre) and the textures painted on them.

/// A filled region in local coordinates.
#[derive(Clone, Debug)]
pub enum Shape {
    /// Centre, radii and rotation (radians).
    Ellipse {
        c: (f32, f32),
        r: (f32, f32),
        rot: f32,
    },
    /// Axis-aligned rectangle `x0, y0, x1, y1`, corners rounded by `round`.
    Rect {
        x0: f32,
        y0: f32,
        x1: f32,
        y1: f32,
        round: f32,
    },
    /// Segment `a`–`b` thickened by `r`.
    Capsule {
        a: (f32, f32),
        b: (f32, f32),
        r: f32,
    },
    /// Simple polygon (even-odd rule).
    Poly(Vec<(f32, f32)>),
    /// Annulus: centre, outer and inner radius.
    Ring { c: (f32, f32), ro: f32, ri: f32 },
}

/// Surface pattern, evaluated in local coordinates so it turns with the object.
#[derive(Clone, Copy, Debug)]
pub enum Tex {
    Flat,
    /// Smooth blotches of relative amplitude `amp`.
    Noise(f32),
    /// Parallel bands across y (`horizontal`) or x with this period.
    Stripes {
        period: f32,
        amp: f32,
        horizontal: bool,
    },
    /// A lattice of darker dots (peel, keys, florets).
    Dots {
        period: f32,
        amp: f32,
    },
    /// Grid of lines (keyboard keys, tiles).
    Grid {
        period: f32,
        amp: f32,
    },
}

/// One coloured piece of an object.
#[derive(Clone, Debug)]
pub struct Part {
    pub shape: Shape,
    /// Linear-ish RGB in [0, 255].
    pub rgb: [f32; 3],
    pub tex: Tex,
}

pub fn ellipse(cx: f32, cy: f32, rx: f32, ry: f32) -> Shape {
    Shape::Ellipse {
        c: (cx, cy),
        r: (rx, ry),
        rot: 0.0,
    }
}
pub fn ellipse_rot(cx: f32, cy: f32, rx: f32, ry: f32, rot: f32) -> Shape {
    Shape::Ellipse {
        c: (cx, cy),
        r: (rx, ry),
        rot,
    }
}
pub fn rect(x0: f32, y0: f32, x1: f32, y1: f32) -> Shape {
    Shape::Rect {
        x0,
        y0,
        x1,
        y1,
        round: 0.0,
    }
}
pub fn rrect(x0: f32, y0: f32, x1: f32, y1: f32, round: f32) -> Shape {
    Shape::Rect {
        x0,
        y0,
        x1,
        y1,
        round,
    }
}
pub fn capsule(ax: f32, ay: f32, bx: f32, by: f32, r: f32) -> Shape {
    Shape::Capsule {
        a: (ax, ay),
        b: (bx, by),
        r,
    }
}
pub fn poly(pts: &[(f32, f32)]) -> Shape {
    Shape::Poly(pts.to_vec())
}
pub fn ring(cx: f32, cy: f32, ro: f32, ri: f32) -> Shape {
    Shape::Ring {
        c: (cx, cy),
        ro,
        ri,
    }
}

impl Shape {
    /// Whether local point (u, v) is inside.
    pub fn contains(&self, u: f32, v: f32) -> bool {
        match self {
            Shape::Ellipse { c, r, rot } => {
                let (du, dv) = (u - c.0, v - c.1);
                let (s, co) = rot.sin_cos();
                let (a, b) = (du * co + dv * s, -du * s + dv * co);
                (a / r.0).powi(2) + (b / r.1).powi(2) <= 1.0
            }
            Shape::Rect {
                x0,
                y0,
                x1,
                y1,
                round,
            } => {
                if u < *x0 || u > *x1 || v < *y0 || v > *y1 {
                    return false;
                }
                if *round <= 0.0 {
                    return true;
                }
                // Distance into the corner square decides the rounding.
                let cx = u.clamp(x0 + round, x1 - round);
                let cy = v.clamp(y0 + round, y1 - round);
                (u - cx).powi(2) + (v - cy).powi(2) <= round * round
            }
            Shape::Capsule { a, b, r } => {
                let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                let len2 = dx * dx + dy * dy;
                let t = if len2 > 0.0 {
                    (((u - a.0) * dx + (v - a.1) * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let (px, py) = (a.0 + t * dx - u, a.1 + t * dy - v);
                px * px + py * py <= r * r
            }
            Shape::Poly(p) => {
                let mut inside = false;
                let n = p.len();
                let mut j = n - 1;
                for i in 0..n {
                    let (xi, yi) = p[i];
                    let (xj, yj) = p[j];
                    if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
                        inside = !inside;
                    }
                    j = i;
                }
                inside
            }
            Shape::Ring { c, ro, ri } => {
                let d2 = (u - c.0).powi(2) + (v - c.1).powi(2);
                d2 <= ro * ro && d2 >= ri * ri
            }
        }
    }

    /// Local bounding box `(x0, y0, x1, y1)`.
    pub fn bounds(&self) -> (f32, f32, f32, f32) {
        match self {
            Shape::Ellipse { c, r, .. } => {
                let m = r.0.max(r.1);
                (c.0 - m, c.1 - m, c.0 + m, c.1 + m)
            }
            Shape::Rect { x0, y0, x1, y1, .. } => (*x0, *y0, *x1, *y1),
            Shape::Capsule { a, b, r } => (
                a.0.min(b.0) - r,
                a.1.min(b.1) - r,
                a.0.max(b.0) + r,
                a.1.max(b.1) + r,
            ),
            Shape::Poly(p) => p.iter().fold(
                (f32::MAX, f32::MAX, f32::MIN, f32::MIN),
                |(a, b, c, d), &(x, y)| (a.min(x), b.min(y), c.max(x), d.max(y)),
            ),
            Shape::Ring { c, ro, .. } => (c.0 - ro, c.1 - ro, c.0 + ro, c.1 + ro),
        }
    }
}

impl Tex {
    /// Multiplicative shade factor at local (u, v); `n` is smooth noise in [0, 1).
    pub fn factor(&self, u: f32, v: f32, n: f32) -> f32 {
        use std::f32::consts::TAU;
        match *self {
            Tex::Flat => 1.0,
            Tex::Noise(amp) => 1.0 + amp * (2.0 * n - 1.0),
            Tex::Stripes {
                period,
                amp,
                horizontal,
            } => {
                let t = if horizontal { v } else { u };
                1.0 + amp * (TAU * t / period).sin()
            }
            Tex::Dots { period, amp } => {
                let (fu, fv) = ((u / period).rem_euclid(1.0), (v / period).rem_euclid(1.0));
                let d = (fu - 0.5).powi(2) + (fv - 0.5).powi(2);
                if d < 0.06 {
                    1.0 - amp
                } else {
                    1.0
                }
            }
            Tex::Grid { period, amp } => {
                let (fu, fv) = ((u / period).rem_euclid(1.0), (v / period).rem_euclid(1.0));
                if fu < 0.2 || fv < 0.2 {
                    1.0 - amp
                } else {
                    1.0
                }
            }
        }
    }
}
