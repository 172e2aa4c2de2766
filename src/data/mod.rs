//! Data: masks, COCO RLE, the MUSE schema, readers for the real data sets, the
//! embedded procedural world, the text corrector, and the tokenizer.
pub mod chat;
pub mod corrector;
pub mod diff;
pub mod erase;
pub mod mask;
pub mod muse;
pub mod paths;
pub mod pickle;
pub mod png;
pub mod polygon;
pub mod readers;
pub mod rle;
pub mod sample;
pub mod tokenizer;
pub mod vocab;
pub mod world;

pub use mask::Mask;
pub use rle::Rle;
