//! How each category looks: a list of coloured parts in the local frame, drawn in order
//! (later parts cover earlier ones).  Form and colour follow the real object closely
//! enough that a person recognizes it at 96×128 and a small model can learn it.
use super::shapes::*;

fn k(rgb: [f32; 3], f: f32) -> [f32; 3] {
    [rgb[0] * f, rgb[1] * f, rgb[2] * f]
}
fn p(shape: Shape, rgb: [f32; 3], tex: Tex) -> Part {
    Part { shape, rgb, tex }
}
const FLAT: Tex = Tex::Flat;
const DARK: [f32; 3] = [35.0, 30.0, 30.0];
const LEAF: [f32; 3] = [60.0, 140.0, 50.0];
const STEEL_DARK: [f32; 3] = [80.0, 80.0, 88.0];

/// Parts of one instance of category `name` with base colour `c`.
#[track_caller]
pub fn parts(name: &str, c: [f32; 3]) -> Vec<Part> {
    let n = |a| Tex::Noise(a);
    match name {
        "apple" => vec![
            p(ellipse(0.0, 0.05, 0.45, 0.42), c, n(0.12)),
            p(ellipse(-0.17, -0.08, 0.09, 0.07), k(c, 1.3), FLAT),
            p(
                capsule(0.0, -0.3, 0.04, -0.47, 0.035),
                [90.0, 55.0, 25.0],
                FLAT,
            ),
            p(ellipse_rot(0.13, -0.4, 0.11, 0.05, -0.4), LEAF, FLAT),
        ],
        "banana" => {
            let (cx, cy, ro, ri) = (0.0f32, -0.55f32, 0.95f32, 0.7f32);
            let mut pts = Vec::new();
            for i in 0..=12 {
                let a = (40.0 + 100.0 * i as f32 / 12.0).to_radians();
                pts.push((cx + ro * a.cos(), cy + ro * a.sin()));
            }
            for i in (0..=12).rev() {
                let a = (45.0 + 90.0 * i as f32 / 12.0).to_radians();
                pts.push((cx + ri * a.cos(), cy + ri * a.sin()));
            }
            vec![
                p(
                    poly(&pts),
                    c,
                    Tex::Stripes {
                        period: 0.5,
                        amp: 0.08,
                        horizontal: false,
                    },
                ),
                p(
                    capsule(-0.7, 0.05, -0.74, 0.0, 0.05),
                    [80.0, 60.0, 30.0],
                    FLAT,
                ),
                p(
                    capsule(0.68, 0.08, 0.72, 0.03, 0.05),
                    [80.0, 60.0, 30.0],
                    FLAT,
                ),
            ]
        }
        "orange" => vec![
            p(
                ellipse(0.0, 0.0, 0.45, 0.45),
                c,
                Tex::Dots {
                    period: 0.1,
                    amp: 0.12,
                },
            ),
            p(ellipse(-0.15, -0.15, 0.08, 0.06), k(c, 1.2), FLAT),
            p(ellipse(0.0, -0.42, 0.07, 0.04), LEAF, FLAT),
        ],
        "carrot" => vec![
            p(capsule(0.0, -0.3, -0.14, -0.58, 0.045), LEAF, FLAT),
            p(capsule(0.0, -0.3, 0.0, -0.62, 0.045), LEAF, FLAT),
            p(capsule(0.0, -0.3, 0.14, -0.58, 0.045), LEAF, FLAT),
            p(
                poly(&[(-0.14, -0.32), (0.14, -0.32), (0.03, 0.55), (-0.03, 0.55)]),
                c,
                Tex::Stripes {
                    period: 0.13,
                    amp: 0.12,
                    horizontal: true,
                },
            ),
        ],
        "broccoli" => {
            let fl = Tex::Dots {
                period: 0.09,
                amp: 0.3,
            };
            vec![
                p(
                    poly(&[(-0.1, 0.0), (0.1, 0.0), (0.15, 0.5), (-0.15, 0.5)]),
                    [150.0, 200.0, 100.0],
                    FLAT,
                ),
                p(ellipse(-0.22, -0.08, 0.22, 0.2), c, fl),
                p(ellipse(0.22, -0.08, 0.22, 0.2), c, fl),
                p(ellipse(0.0, -0.24, 0.25, 0.22), k(c, 1.1), fl),
                p(ellipse(0.0, 0.02, 0.2, 0.14), k(c, 0.9), fl),
            ]
        }
        "cake" => vec![
            p(
                rect(-0.5, -0.1, 0.5, 0.35),
                c,
                Tex::Stripes {
                    period: 0.15,
                    amp: 0.15,
                    horizontal: true,
                },
            ),
            p(ellipse(0.0, 0.35, 0.5, 0.08), c, FLAT),
            p(ellipse(0.0, -0.1, 0.5, 0.13), [245.0, 240.0, 235.0], FLAT),
            p(ellipse(0.0, -0.24, 0.08, 0.08), [200.0, 20.0, 30.0], FLAT),
        ],
        "bread" => vec![
            p(ellipse(0.0, 0.0, 0.55, 0.3), [200.0, 145.0, 75.0], n(0.12)),
            p(
                capsule(-0.3, -0.18, -0.2, 0.14, 0.035),
                [140.0, 90.0, 45.0],
                FLAT,
            ),
            p(
                capsule(-0.05, -0.2, 0.05, 0.16, 0.035),
                [140.0, 90.0, 45.0],
                FLAT,
            ),
            p(
                capsule(0.2, -0.18, 0.3, 0.14, 0.035),
                [140.0, 90.0, 45.0],
                FLAT,
            ),
        ],
        "fork" => {
            let mut v = vec![
                p(capsule(0.0, 0.05, 0.0, 0.5, 0.055), c, n(0.08)),
                p(
                    poly(&[(-0.05, 0.06), (0.05, 0.06), (0.12, -0.16), (-0.12, -0.16)]),
                    c,
                    FLAT,
                ),
            ];
            for x in [-0.09f32, 0.0, 0.09] {
                v.push(p(capsule(x, -0.15, x, -0.48, 0.032), c, FLAT));
            }
            v
        }
        "knife" => vec![
            p(
                poly(&[(-0.06, 0.05), (0.075, 0.05), (0.075, -0.36), (-0.06, -0.5)]),
                c,
                n(0.06),
            ),
            p(
                rrect(-0.075, 0.05, 0.085, 0.5, 0.05),
                [55.0, 38.0, 28.0],
                FLAT,
            ),
        ],
        "spoon" => vec![
            p(capsule(0.0, -0.12, 0.0, 0.5, 0.05), c, n(0.08)),
            p(ellipse(0.0, -0.3, 0.14, 0.2), c, FLAT),
            p(ellipse(-0.04, -0.34, 0.05, 0.08), k(c, 1.15), FLAT),
        ],
        "cup" => vec![
            p(ring(0.33, 0.0, 0.2, 0.1), k(c, 0.92), FLAT),
            p(
                poly(&[(-0.35, -0.35), (0.3, -0.35), (0.25, 0.4), (-0.3, 0.4)]),
                c,
                n(0.06),
            ),
            p(
                ellipse(-0.025, -0.35, 0.325, 0.07),
                [95.0, 60.0, 35.0],
                FLAT,
            ),
        ],
        "plate" => vec![
            p(ellipse(0.0, 0.0, 0.5, 0.2), c, FLAT),
            p(ellipse(0.0, 0.0, 0.36, 0.13), k(c, 0.9), FLAT),
        ],
        "bowl" => {
            let mut pts = Vec::new();
            for i in 0..=16 {
                let a = std::f32::consts::PI * i as f32 / 16.0;
                pts.push((0.5 * a.cos(), 0.42 * a.sin()));
            }
            vec![
                p(poly(&pts), c, n(0.08)),
                p(ellipse(0.0, 0.0, 0.5, 0.1), k(c, 1.15), FLAT),
                p(ellipse(0.0, 0.0, 0.43, 0.07), k(c, 0.65), FLAT),
            ]
        }
        "bottle" => vec![
            p(
                rrect(-0.15, -0.1, 0.15, 0.5, 0.05),
                c,
                Tex::Stripes {
                    period: 0.3,
                    amp: 0.1,
                    horizontal: false,
                },
            ),
            p(
                poly(&[(-0.15, -0.1), (0.15, -0.1), (0.06, -0.3), (-0.06, -0.3)]),
                c,
                FLAT,
            ),
            p(rect(-0.06, -0.45, 0.06, -0.29), c, FLAT),
            p(rect(-0.07, -0.52, 0.07, -0.44), [190.0, 40.0, 30.0], FLAT),
            p(rect(-0.15, 0.08, 0.15, 0.28), [240.0, 235.0, 220.0], FLAT),
        ],
        "laptop" => vec![
            p(rect(-0.5, -0.45, 0.5, 0.15), c, FLAT),
            p(rect(-0.44, -0.4, 0.44, 0.1), [70.0, 120.0, 200.0], n(0.2)),
            p(
                poly(&[(-0.5, 0.15), (0.5, 0.15), (0.62, 0.35), (-0.62, 0.35)]),
                k(c, 1.15),
                Tex::Grid {
                    period: 0.07,
                    amp: 0.2,
                },
            ),
        ],
        "mouse" => vec![
            p(capsule(0.0, -0.37, 0.06, -0.52, 0.035), STEEL_DARK, FLAT),
            p(ellipse(0.0, 0.05, 0.3, 0.42), c, n(0.06)),
            p(rect(-0.025, -0.37, 0.025, -0.08), k(c, 0.5), FLAT),
        ],
        "keyboard" => vec![p(
            rrect(-0.6, -0.22, 0.6, 0.22, 0.04),
            c,
            Tex::Grid {
                period: 0.1,
                amp: 0.35,
            },
        )],
        "book" => vec![
            p(rect(-0.35, -0.45, 0.35, 0.45), c, n(0.08)),
            p(rect(-0.35, -0.45, -0.24, 0.45), k(c, 0.65), FLAT),
            p(
                rect(0.29, -0.42, 0.35, 0.42),
                [240.0, 235.0, 220.0],
                Tex::Stripes {
                    period: 0.04,
                    amp: 0.1,
                    horizontal: false,
                },
            ),
            p(rect(-0.12, -0.28, 0.22, -0.16), [225.0, 190.0, 80.0], FLAT),
        ],
        "lamp" => vec![
            p(rect(-0.035, -0.2, 0.035, 0.43), STEEL_DARK, FLAT),
            p(ellipse(0.0, 0.45, 0.2, 0.06), STEEL_DARK, FLAT),
            p(
                poly(&[(-0.18, -0.5), (0.18, -0.5), (0.32, -0.2), (-0.32, -0.2)]),
                c,
                Tex::Stripes {
                    period: 0.08,
                    amp: 0.06,
                    horizontal: false,
                },
            ),
            p(
                ellipse(0.0, -0.19, 0.12, 0.045),
                [255.0, 250.0, 200.0],
                FLAT,
            ),
        ],
        "phone" => vec![
            p(rrect(-0.25, -0.45, 0.25, 0.45, 0.07), c, FLAT),
            p(rect(-0.2, -0.36, 0.2, 0.36), [80.0, 140.0, 210.0], n(0.25)),
        ],
        "clock" => vec![
            p(ellipse(0.0, 0.0, 0.5, 0.5), DARK, FLAT),
            p(ellipse(0.0, 0.0, 0.42, 0.42), c, FLAT),
            p(rect(-0.025, -0.4, 0.025, -0.32), DARK, FLAT),
            p(rect(-0.025, 0.32, 0.025, 0.4), DARK, FLAT),
            p(rect(-0.4, -0.025, -0.32, 0.025), DARK, FLAT),
            p(rect(0.32, -0.025, 0.4, 0.025), DARK, FLAT),
            p(capsule(0.0, 0.0, 0.0, -0.3, 0.04), DARK, FLAT),
            p(capsule(0.0, 0.0, 0.22, 0.08, 0.04), DARK, FLAT),
        ],
        "candle" => vec![
            p(rect(-0.12, -0.2, 0.12, 0.5), c, n(0.05)),
            p(rect(-0.02, -0.27, 0.02, -0.19), DARK, FLAT),
            p(ellipse(0.0, -0.36, 0.075, 0.11), [255.0, 170.0, 30.0], FLAT),
            p(
                ellipse(0.0, -0.33, 0.035, 0.055),
                [255.0, 245.0, 190.0],
                FLAT,
            ),
        ],
        "chair" => {
            let g = Tex::Stripes {
                period: 0.05,
                amp: 0.1,
                horizontal: false,
            };
            vec![
                p(rect(-0.3, -0.5, -0.21, 0.1), c, g),
                p(rect(0.21, -0.5, 0.3, 0.1), c, g),
                p(rect(-0.3, -0.5, 0.3, -0.38), k(c, 1.1), g),
                p(rect(-0.3, -0.27, 0.3, -0.18), k(c, 1.1), g),
                p(rect(-0.34, 0.0, 0.34, 0.1), k(c, 1.2), g),
                p(rect(-0.32, 0.1, -0.25, 0.5), c, g),
                p(rect(0.25, 0.1, 0.32, 0.5), c, g),
            ]
        }
        "couch" => vec![
            p(rect(-0.85, 0.3, -0.75, 0.42), DARK, FLAT),
            p(rect(0.75, 0.3, 0.85, 0.42), DARK, FLAT),
            p(rrect(-0.9, -0.45, 0.9, 0.05, 0.1), k(c, 0.9), n(0.1)),
            p(rrect(-0.85, 0.0, 0.85, 0.32, 0.06), c, n(0.1)),
            p(rect(-0.01, 0.0, 0.01, 0.32), k(c, 0.6), FLAT),
            p(rrect(-1.0, -0.2, -0.74, 0.35, 0.08), k(c, 0.8), n(0.1)),
            p(rrect(0.74, -0.2, 1.0, 0.35, 0.08), k(c, 0.8), n(0.1)),
        ],
        "tv" => vec![
            p(rect(-0.06, 0.38, 0.06, 0.48), STEEL_DARK, FLAT),
            p(rect(-0.3, 0.46, 0.3, 0.52), STEEL_DARK, FLAT),
            p(rrect(-0.8, -0.5, 0.8, 0.4, 0.03), c, FLAT),
            p(rect(-0.72, -0.43, 0.72, 0.33), [45.0, 70.0, 120.0], n(0.35)),
        ],
        "plant" => vec![
            p(ellipse_rot(-0.15, -0.15, 0.1, 0.3, -0.5), c, FLAT),
            p(ellipse_rot(0.15, -0.15, 0.1, 0.3, 0.5), k(c, 0.85), FLAT),
            p(ellipse_rot(0.0, -0.28, 0.1, 0.3, 0.0), k(c, 1.1), FLAT),
            p(ellipse_rot(-0.3, -0.02, 0.08, 0.25, -1.0), k(c, 0.9), FLAT),
            p(ellipse_rot(0.3, -0.02, 0.08, 0.25, 1.0), c, FLAT),
            p(
                poly(&[(-0.22, 0.1), (0.22, 0.1), (0.16, 0.5), (-0.16, 0.5)]),
                [190.0, 90.0, 50.0],
                n(0.08),
            ),
            p(rect(-0.24, 0.08, 0.24, 0.15), [170.0, 80.0, 45.0], FLAT),
        ],
        "vase" => vec![
            p(
                ellipse(0.0, 0.15, 0.3, 0.33),
                c,
                Tex::Stripes {
                    period: 0.16,
                    amp: 0.18,
                    horizontal: true,
                },
            ),
            p(rect(-0.1, -0.4, 0.1, -0.1), c, FLAT),
            p(ellipse(0.0, -0.4, 0.15, 0.05), k(c, 0.8), FLAT),
        ],
        "cat" => {
            let t = Tex::Stripes {
                period: 0.12,
                amp: 0.15,
                horizontal: true,
            };
            vec![
                p(capsule(0.3, 0.4, 0.5, 0.1, 0.06), c, FLAT),
                p(ellipse(0.0, 0.2, 0.33, 0.3), c, t),
                p(
                    poly(&[(-0.2, -0.28), (-0.05, -0.36), (-0.19, -0.52)]),
                    c,
                    FLAT,
                ),
                p(poly(&[(0.2, -0.28), (0.05, -0.36), (0.19, -0.52)]), c, FLAT),
                p(ellipse(0.0, -0.2, 0.22, 0.2), c, t),
                p(
                    ellipse(-0.08, -0.23, 0.045, 0.035),
                    [120.0, 200.0, 60.0],
                    FLAT,
                ),
                p(
                    ellipse(0.08, -0.23, 0.045, 0.035),
                    [120.0, 200.0, 60.0],
                    FLAT,
                ),
                p(ellipse(0.0, -0.14, 0.03, 0.02), [230.0, 130.0, 140.0], FLAT),
            ]
        }
        "dog" => vec![
            p(capsule(-0.45, 0.0, -0.68, -0.2, 0.05), c, FLAT),
            p(rect(-0.4, 0.1, -0.3, 0.5), k(c, 0.9), FLAT),
            p(rect(-0.2, 0.1, -0.1, 0.5), c, FLAT),
            p(rect(0.15, 0.1, 0.25, 0.5), k(c, 0.9), FLAT),
            p(rect(0.32, 0.1, 0.42, 0.5), c, FLAT),
            p(ellipse(0.0, 0.05, 0.5, 0.22), c, n(0.1)),
            p(ellipse(0.55, -0.2, 0.2, 0.17), c, n(0.1)),
            p(ellipse(0.73, -0.14, 0.11, 0.07), k(c, 0.85), FLAT),
            p(ellipse(0.82, -0.16, 0.035, 0.03), DARK, FLAT),
            p(ellipse(0.6, -0.25, 0.03, 0.03), DARK, FLAT),
            p(ellipse(0.46, -0.14, 0.07, 0.15), k(c, 0.7), FLAT),
        ],
        "violin" => vec![
            p(
                ellipse(0.0, 0.22, 0.28, 0.22),
                c,
                Tex::Stripes {
                    period: 0.06,
                    amp: 0.08,
                    horizontal: false,
                },
            ),
            p(
                ellipse(0.0, -0.12, 0.22, 0.18),
                c,
                Tex::Stripes {
                    period: 0.06,
                    amp: 0.08,
                    horizontal: false,
                },
            ),
            p(rect(-0.16, -0.05, 0.16, 0.12), k(c, 0.95), FLAT),
            p(ellipse(0.0, -0.52, 0.055, 0.055), k(c, 0.8), FLAT),
            p(rect(-0.04, -0.5, 0.04, 0.25), DARK, FLAT),
            p(capsule(-0.12, 0.06, -0.12, 0.2, 0.015), DARK, FLAT),
            p(capsule(0.12, 0.06, 0.12, 0.2, 0.015), DARK, FLAT),
            p(rect(-0.09, 0.26, 0.09, 0.29), [220.0, 200.0, 160.0], FLAT),
        ],
        "guitar" => vec![
            p(rect(-0.065, -0.66, 0.065, -0.52), DARK, FLAT),
            p(rect(-0.045, -0.55, 0.045, -0.15), [90.0, 55.0, 30.0], FLAT),
            p(ellipse(0.0, 0.25, 0.3, 0.25), c, n(0.08)),
            p(ellipse(0.0, -0.05, 0.23, 0.2), c, n(0.08)),
            p(ellipse(0.0, 0.08, 0.08, 0.08), DARK, FLAT),
            p(rect(-0.045, -0.3, 0.045, 0.0), [90.0, 55.0, 30.0], FLAT),
            p(rect(-0.1, 0.3, 0.1, 0.35), DARK, FLAT),
        ],
        "drum" => vec![
            p(
                capsule(-0.25, -0.5, 0.05, -0.22, 0.03),
                [210.0, 170.0, 110.0],
                FLAT,
            ),
            p(
                rect(-0.45, -0.2, 0.45, 0.35),
                c,
                Tex::Stripes {
                    period: 0.15,
                    amp: 0.2,
                    horizontal: false,
                },
            ),
            p(ellipse(0.0, 0.35, 0.45, 0.1), k(c, 0.85), FLAT),
            p(ellipse(0.0, -0.2, 0.45, 0.1), [232.0, 226.0, 210.0], FLAT),
            p(
                capsule(0.3, -0.48, 0.0, -0.24, 0.03),
                [210.0, 170.0, 110.0],
                FLAT,
            ),
        ],
        "pillow" => vec![p(
            rrect(-0.5, -0.32, 0.5, 0.32, 0.15),
            c,
            Tex::Dots {
                period: 0.14,
                amp: 0.12,
            },
        )],
        other => panic!("no design for category `{other}`"),
    }
}

/// Whether a category hangs on the wall rather than standing on the floor or table.
pub fn on_wall(name: &str) -> bool {
    name == "clock"
}

/// Rotation range (radians) and whether the object may be mirrored.
pub fn pose_range(name: &str) -> (f32, bool) {
    match name {
        "fork" | "knife" | "spoon" | "carrot" => (0.9, true),
        "banana" | "book" | "violin" => (0.5, true),
        "phone" | "mouse" | "bread" => (0.3, true),
        "cup" | "dog" | "cat" | "guitar" => (0.06, true),
        _ => (0.05, false),
    }
}
