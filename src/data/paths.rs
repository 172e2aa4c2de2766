//! Paths read from files (a data file's `file_name`, and any path a run directory or a
//! config names) stay inside the root they are relative to.
//!
//! The check is on the path text, not on where symbolic links lead: image folders are
//! often linked into a data root, and links on disk are the user's to make.  A hostile
//! data file, on the other hand, is not: `../../home/you/.ssh/id_rsa` or `/etc/shadow`
//! as a `file_name` is refused with an error naming the file, the field and the path.
//! The path handed back is normalized, so the file system never sees a `..` either
//! (`a/../b` would otherwise step out through `a` when `a` is a link).
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Join the root-relative path `rel` onto `root`, refusing what could leave the root:
/// an absolute path, a drive (`C:`) or UNC prefix, a `..` that climbs above the root,
/// a NUL byte, and a path that names no file (empty, `.`, `a/..`).  `\` counts as a
/// separator as well as `/` (data sets written on Windows use it, and a Windows reader
/// would follow `..\..`).  `file` and `field` say where `rel` was read, for the error.
///
/// `.` components are dropped and `x/..` pairs resolved in the text, so the result is
/// `root` followed by plain names only.
pub fn resolve_in_root(root: &Path, rel: &str, file: &Path, field: &str) -> Result<PathBuf> {
    let refuse = |why: &str| Error::Data {
        path: file.to_path_buf(),
        field: field.to_string(),
        msg: format!("path {rel:?} {why}"),
    };
    if rel.contains('\0') {
        return Err(refuse("contains a NUL byte"));
    }
    if rel.starts_with(['/', '\\']) || Path::new(rel).is_absolute() {
        return Err(refuse("is absolute; it must be relative to the data root"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for (k, part) in rel.split(['/', '\\']).enumerate() {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(refuse("leaves the data root (`..`)"));
                }
            }
            p if k == 0 && has_drive_prefix(p) => {
                return Err(refuse(
                    "starts with a drive letter; it must be relative to the data root",
                ))
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(refuse("names no file"));
    }
    let mut out = root.to_path_buf();
    out.extend(parts);
    Ok(out)
}

/// `C:` (and `C:foo`, which Windows reads relative to drive C's current folder).
fn has_drive_prefix(first: &str) -> bool {
    let b = first.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(rel: &str) -> Result<PathBuf> {
        resolve_in_root(
            Path::new("/data"),
            rel,
            Path::new("train.json"),
            "[3].file_name",
        )
    }

    #[test]
    fn paths_inside_the_root_are_joined_and_normalized() {
        let ok = [
            ("images/a.png", "/data/images/a.png"),
            ("./images/./a.png", "/data/images/a.png"),
            ("images//a.png", "/data/images/a.png"),
            ("images/x/../a.png", "/data/images/a.png"),
            ("images\\a.png", "/data/images/a.png"),
            ("a..b.png", "/data/a..b.png"),
            ("...", "/data/..."),
        ];
        for (rel, want) in ok {
            assert_eq!(resolve(rel).unwrap(), PathBuf::from(want), "{rel}");
        }
    }

    #[test]
    fn paths_that_leave_the_root_are_refused_naming_file_field_and_path() {
        let bad = [
            ("../secret.png", "leaves the data root"),
            ("images/../../secret.png", "leaves the data root"),
            ("..\\..\\secret.png", "leaves the data root"),
            ("images\\..\\..\\secret.png", "leaves the data root"),
            ("/etc/passwd", "is absolute"),
            ("\\\\server\\share\\a.png", "is absolute"),
            ("\\windows\\a.png", "is absolute"),
            ("C:\\images\\a.png", "drive letter"),
            ("c:a.png", "drive letter"),
            ("", "names no file"),
            (".", "names no file"),
            ("images/..", "names no file"),
            ("a\0.png", "NUL byte"),
        ];
        for (rel, why) in bad {
            let e = resolve(rel).unwrap_err().to_string();
            assert!(e.contains(why), "{rel:?}: {e}");
            assert!(e.contains("train.json"), "{e}");
            assert!(e.contains("[3].file_name"), "{e}");
            assert!(e.contains(&format!("{rel:?}")), "{e}");
        }
    }
}
