//! The library's one error type.  Bad user input is always an `Err` that says what to
//! fix and where (file, tensor, field, line); panics are reserved for broken internal
//! contracts.
use std::path::PathBuf;

/// Errors from every part of the crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer or tensor has the wrong size for the operation.
    #[error("shape mismatch in {op}: {msg}")]
    Shape {
        /// Operation that rejected the input, e.g. `"ConvStem::forward"`.
        op: &'static str,
        /// What does not match, with the sizes involved.
        msg: String,
    },
    /// An argument is out of its documented range.
    #[error("invalid argument to {op}: {msg}")]
    InvalidArg {
        /// Operation that rejected the argument, e.g. `"ConvStem::new"`.
        op: &'static str,
        /// The value given and the range it must lie in.
        msg: String,
    },
    /// NaN or infinity where a finite number is required.
    #[error("non-finite value in {what}")]
    NonFinite {
        /// The quantity (and where known, the step or element) that went non-finite.
        what: String,
    },
    /// File system error with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// File or directory being read or written.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Malformed JSON (or JSON lines); `line` is 1-based where it applies.
    #[error("{path}{}: {msg}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json {
        /// File that failed to parse.
        path: PathBuf,
        /// 1-based line number for JSON-lines files; `None` for a whole-file document.
        line: Option<usize>,
        /// Parser message or description of the malformed value.
        msg: String,
    },
    /// A data file is readable but a field in it is wrong.
    #[error("{path}: field `{field}`: {msg}")]
    Data {
        /// Data file the field comes from.
        path: PathBuf,
        /// Name of the offending field.
        field: String,
        /// What is wrong with the field's value.
        msg: String,
    },
    /// A safetensors file is truncated, hostile or does not match the model.
    #[error("{path}: {msg}")]
    Safetensors {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong: the header, a tensor's dtype, shape or byte range.
        msg: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint file searched.
        path: PathBuf,
        /// Name of the absent tensor.
        name: String,
    },
    /// A model configuration value is missing or unsupported.
    #[error("{path}: config field `{field}`: {msg}")]
    Config {
        /// The configuration file (e.g. `config.json`).
        path: PathBuf,
        /// Name of the missing or unsupported field.
        field: String,
        /// Why the value is rejected.
        msg: String,
    },
    /// An image that does not decode or has the wrong size.
    #[error("{path}: {msg}")]
    Image {
        /// The image file, or `<memory>` when encoding to a buffer.
        path: PathBuf,
        /// Decode error or size mismatch.
        msg: String,
    },
    /// Tokenizer load/train/encode failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A kernel launch or device operation failed (emulator or CUDA).
    #[error("device: {0}")]
    Device(String),
    /// A feature that this build or this input does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::Shape`].
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    /// Shorthand for [`Error::InvalidArg`].
    pub fn arg(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArg {
            op,
            msg: msg.into(),
        }
    }
    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Err(Shape)` unless `got == want`.
#[track_caller]
pub fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{what} has {got} elements, expected {want}"),
        ))
    }
}
