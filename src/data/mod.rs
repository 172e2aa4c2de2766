//! Data: masks, COCO RLE, the MUSE schema, readers for the real data sets, the
//! embedded procedural world, the text corrector, and the tokenizer.
pub mod mask;
pub mod muse;
pub mod polygon;
pub mod rle;

pub use mask::Mask;
pub use rle::Rle;
