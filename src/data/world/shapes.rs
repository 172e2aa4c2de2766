//! Shape primitives in an object's local frame (unit = the object's nominal size,
//! x right, y down, origin at the object's centre) and the textures painted on them.

/// A filled region in local coordinates.
#[derive(Clone, Debug)]
pub enum Shape {
    /// Centre, radii and rotation (radians).
    Ellipse {
        /// Centre `(x, y)`.
        c: (f32, f32),
        /// Radii along the ellipse's own x and y axes.
        r: (f32, f32),
        /// Rotation of those axes, in radians.
        rot: f32,
    },
    /// Axis-aligned rectangle `x0, y0, x1, y1`, corners rounded by `round`.
    Rect {
        /// Left edge.
        x0: f32,
        /// Top edge.
        y0: f32,
        /// Right edge.
        x1: f32,
        /// Bottom edge.
        y1: f32,
        /// Corner radius; 0 for square corners.
        round: f32,
    },
    /// Segment `a`–`b` thickened by `r`.
    Capsule {
        /// One end of the segment.
        a: (f32, f32),
        /// The other end.
        b: (f32, f32),
        /// Half the thickness: points within `r` of the segment are inside.
        r: f32,
    },
    /// Simple polygon (even-odd rule).
    Poly(Vec<(f32, f32)>),
    /// Annulus: centre, outer and inner radius.
    Ring {
        /// Centre `(x, y)`.
        c: (f32, f32),
        /// Outer radius.
        ro: f32,
        /// Inner radius (the hole).
        ri: f32,
    },
}

/// Surface pattern, evaluated in local coordinates so it turns with the object.
#[derive(Clone, Copy, Debug)]
pub enum Tex {
    /// Plain colour (factor 1).
    Flat,
    /// Smooth blotches of relative amplitude `amp`.
    Noise(f32),
    /// Parallel bands across y (`horizontal`) or x with this period.
    Stripes {
        /// Band period, in local units.
        period: f32,
        /// Sine amplitude of the shade factor (`1 ± amp`).
        amp: f32,
        /// Bands vary along y (horizontal bands) when true, along x otherwise.
        horizontal: bool,
    },
    /// A lattice of darker dots (peel, keys, florets).
    Dots {
        /// Lattice spacing, in local units.
        period: f32,
        /// How much a dot darkens (factor `1 - amp`).
        amp: f32,
    },
    /// Grid of lines (keyboard keys, tiles).
    Grid {
        /// Cell size, in local units (lines take a fifth of it).
        period: f32,
        /// How much a line darkens (factor `1 - amp`).
        amp: f32,
    },
}

/// One coloured piece of an object.
#[derive(Clone, Debug)]
pub struct Part {
    /// The region the part covers, in local units.
    pub shape: Shape,
    /// Linear-ish RGB in [0, 255].
    pub rgb: [f32; 3],
    /// The pattern shading `rgb`.
    pub tex: Tex,
}

/// An axis-aligned ellipse centred at `(cx, cy)` with radii `rx`, `ry`.
pub fn ellipse(cx: f32, cy: f32, rx: f32, ry: f32) -> Shape {
    Shape::Ellipse {
        c: (cx, cy),
        r: (rx, ry),
        rot: 0.0,
    }
}
/// An ellipse centred at `(cx, cy)` with radii `rx`, `ry`, rotated by `rot` radians.
pub fn ellipse_rot(cx: f32, cy: f32, rx: f32, ry: f32, rot: f32) -> Shape {
    Shape::Ellipse {
        c: (cx, cy),
        r: (rx, ry),
        rot,
    }
}
/// A square-cornered rectangle from `(x0, y0)` to `(x1, y1)`.
pub fn rect(x0: f32, y0: f32, x1: f32, y1: f32) -> Shape {
    Shape::Rect {
        x0,
        y0,
        x1,
        y1,
        round: 0.0,
    }
}
/// A rectangle from `(x0, y0)` to `(x1, y1)` with corners of radius `round`.
pub fn rrect(x0: f32, y0: f32, x1: f32, y1: f32, round: f32) -> Shape {
    Shape::Rect {
        x0,
        y0,
        x1,
        y1,
        round,
    }
}
/// The segment `(ax, ay)`–`(bx, by)` thickened by `r`.
pub fn capsule(ax: f32, ay: f32, bx: f32, by: f32, r: f32) -> Shape {
    Shape::Capsule {
        a: (ax, ay),
        b: (bx, by),
        r,
    }
}
/// A polygon through `pts` (even-odd rule).
pub fn poly(pts: &[(f32, f32)]) -> Shape {
    Shape::Poly(pts.to_vec())
}
/// An annulus centred at `(cx, cy)` with outer radius `ro` and inner radius `ri`.
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
                // a radius beyond half the shorter side rounds as much as it can
                let round = round.min((x1 - x0) / 2.0).min((y1 - y0) / 2.0);
                if round <= 0.0 {
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
                if n == 0 {
                    return false;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes the public constructors accept but the world never draws: an empty
    /// polygon and a corner radius beyond half a side are answers, not panics.
    #[test]
    fn degenerate_shapes_answer_without_panicking() {
        assert!(!poly(&[]).contains(0.0, 0.0));
        // radius 5 on a 4 × 2 rectangle: as round as it can be (radius 1)
        let r = rrect(0.0, 0.0, 4.0, 2.0, 5.0);
        assert!(r.contains(2.0, 1.0), "the centre is inside");
        assert!(!r.contains(0.05, 0.05), "a corner is cut");
        assert_eq!(
            r.contains(0.3, 1.0),
            rrect(0.0, 0.0, 4.0, 2.0, 1.0).contains(0.3, 1.0)
        );
        // a radius within half the side is unchanged
        let a = rrect(0.0, 0.0, 4.0, 4.0, 1.5);
        assert!(!a.contains(0.1, 0.1) && a.contains(1.5, 0.1));
    }
}
