//! Training: the AdamW optimizer and the warmup-then-decay learning-rate schedule
//! (Supp Table 7: AdamW, lr 3e-4, β = (0.9, 0.95), weight decay 0, warmup 100 steps).
pub mod adamw;
pub mod schedule;

pub use adamw::{clip_grad_norm, AdamW, AdamWConfig};
pub use schedule::WarmupDecayLR;
