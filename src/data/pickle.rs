//! A minimal reader for Python pickles of plain data: `None`, bools, ints, floats,
//! strings, bytes, lists, tuples, dicts and sets — what refCOCO's `refs(unc).p` holds.
//! Protocols 0 through 5 (Python 2's `cPickle` files and Python 3's default).
//!
//! Why not the `serde-pickle` crate: the refs files need a dozen opcodes; writing them
//! here keeps the dependency list short, gives errors that name the file, the byte
//! offset and the opcode, and makes "no objects" a hard rule: any opcode that would
//! build a class instance or call a function (`GLOBAL`, `REDUCE`, `BUILD`, `NEWOBJ`, …)
//! is an `Err`, so a pickle that is not plain data is refused, not half-read.
//!
//! Memoized containers are shared the way Python shares them (a list filled after it
//! was memoized is seen filled through `GET`), by building in an arena of nodes.
use std::path::Path;

use crate::error::{Error, Result};

/// A plain Python value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`
    None,
    /// `True` / `False`
    Bool(bool),
    /// `int` (Python 2 `long` too); one that does not fit in i64 is an `Err`
    Int(i64),
    /// `float` (a double)
    Float(f64),
    /// `str` (and Python 2 `str`, decoded as UTF-8, else Latin-1)
    Str(String),
    /// `bytes`
    Bytes(Vec<u8>),
    /// `list`
    List(Vec<Value>),
    /// `tuple`
    Tuple(Vec<Value>),
    /// key-value pairs in insertion order
    Dict(Vec<(Value, Value)>),
    /// `set` or `frozenset`, items in the order the pickle adds them
    Set(Vec<Value>),
}

impl Value {
    /// The value under string key `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(kv) => kv
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
    /// The text of a `str`; `None` for any other type.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// An int, or a bool as 0 / 1; `None` for any other type.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    /// Items of a list or tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }
    /// The Python type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
        }
    }
}

/// Deepest nesting accepted (guards against self-referencing containers, which plain
/// data never has, and stack exhaustion).
const MAX_DEPTH: usize = 100;

/// Most values a pickle of `n` bytes may expand to, over `n` itself.  Memo references
/// let a few bytes name a whole shared container again ("billion laughs"); plain data
/// shares only small strings, so a generous multiple of the input size is enough.
const EXPANSION: usize = 16;

/// Arena node: containers hold node indices so that memo references alias.
#[derive(Clone)]
enum Node {
    Leaf(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Set(Vec<usize>),
}

/// A stack slot: a node or a MARK.
#[derive(Clone, Copy)]
enum Slot {
    Mark,
    Node(usize),
}

struct Vm<'a> {
    b: &'a [u8],
    p: usize,
    /// offset of the opcode being run, for errors
    op_at: usize,
    nodes: Vec<Node>,
    stack: Vec<Slot>,
    memo: std::collections::HashMap<u64, usize>,
}

impl<'a> Vm<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::arg("pickle", format!("at byte {}: {msg}", self.op_at))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() - self.p < n {
            return Err(self.err(format!("truncated: {n} bytes wanted")));
        }
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn le(&mut self, n: usize) -> Result<u64> {
        let s = self.take(n)?;
        Ok(s.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    }
    fn line_bytes(&mut self) -> Result<&'a [u8]> {
        let rest = &self.b[self.p..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("text argument has no newline"))?;
        self.p += n + 1;
        Ok(&rest[..n])
    }
    fn line(&mut self) -> Result<&'a str> {
        let b = self.line_bytes()?;
        std::str::from_utf8(b).map_err(|_| self.err("text argument is not ASCII"))
    }
    fn push(&mut self, n: Node) {
        self.nodes.push(n);
        self.stack.push(Slot::Node(self.nodes.len() - 1));
    }
    fn leaf(&mut self, v: Value) {
        self.push(Node::Leaf(v));
    }
    fn pop(&mut self) -> Result<usize> {
        match self.stack.pop() {
            Some(Slot::Node(i)) => Ok(i),
            Some(Slot::Mark) => Err(self.err("found a MARK where a value was expected")),
            None => Err(self.err("stack underflow")),
        }
    }
    fn top(&self) -> Result<usize> {
        match self.stack.last() {
            Some(Slot::Node(i)) => Ok(*i),
            _ => Err(self.err("no value on the stack")),
        }
    }
    /// Pop everything down to the last MARK (and the mark).
    fn pop_mark(&mut self) -> Result<Vec<usize>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = self.stack[at + 1..]
            .iter()
            .map(|s| match s {
                Slot::Node(i) => *i,
                Slot::Mark => unreachable!("rposition found the last mark"),
            })
            .collect();
        self.stack.truncate(at);
        Ok(items)
    }
    fn extend_list(&mut self, list: usize, items: Vec<usize>) -> Result<()> {
        match &mut self.nodes[list] {
            Node::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => Err(self.err("APPEND to something that is not a list")),
        }
    }
    fn set_items(&mut self, dict: usize, items: Vec<usize>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of values"));
        }
        match &mut self.nodes[dict] {
            Node::Dict(kv) => {
                for pair in items.chunks_exact(2) {
                    kv.push((pair[0], pair[1]));
                }
                Ok(())
            }
            _ => Err(self.err("SETITEM on something that is not a dict")),
        }
    }
    fn memo_put(&mut self, key: u64) -> Result<()> {
        let t = self.top()?;
        self.memo.insert(key, t);
        Ok(())
    }
    fn memo_get(&mut self, key: u64) -> Result<()> {
        let i = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.err(format!("memo key {key} was never stored")))?;
        self.stack.push(Slot::Node(i));
        Ok(())
    }
    fn str_from_py2(bytes: &[u8]) -> String {
        match std::str::from_utf8(bytes) {
            Ok(s) => s.to_string(),
            Err(_) => bytes.iter().map(|&c| c as char).collect(),
        }
    }
    fn utf8(&self, bytes: &[u8]) -> Result<String> {
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("str is not valid UTF-8"))
    }

    fn run(&mut self) -> Result<usize> {
        loop {
            self.op_at = self.p;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.err(format!("protocol {v} is newer than 5")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack
                        .pop()
                        .ok_or_else(|| self.err("POP on empty stack"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(Slot::Node(t));
                }
                b'N' => self.leaf(Value::None),
                0x88 => self.leaf(Value::Bool(true)),
                0x89 => self.leaf(Value::Bool(false)),
                b'I' => {
                    let s = self.line()?;
                    let v = match s {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => Value::Int(
                            s.trim()
                                .parse()
                                .map_err(|_| self.err(format!("bad INT {s:?}")))?,
                        ),
                    };
                    self.leaf(v);
                }
                b'L' => {
                    let s = self.line()?;
                    let v: i64 = s
                        .trim_end_matches('L')
                        .parse()
                        .map_err(|_| self.err(format!("LONG {s:?} does not fit in i64")))?;
                    self.leaf(Value::Int(v));
                }
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.leaf(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.leaf(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.leaf(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement of n bytes
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.le(4)? as usize
                    };
                    if n > 8 {
                        return Err(self.err(format!("a {n}-byte integer does not fit in i64")));
                    }
                    let bytes = self.take(n)?;
                    let mut v: i64 = 0;
                    for (k, &x) in bytes.iter().enumerate() {
                        v |= (x as i64) << (8 * k);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.leaf(Value::Int(v));
                }
                b'F' => {
                    let s = self.line()?;
                    let v: f64 = s
                        .trim()
                        .parse()
                        .map_err(|_| self.err(format!("bad FLOAT {s:?}")))?;
                    self.leaf(Value::Float(v));
                }
                b'G' => {
                    let s = self.take(8)?;
                    let v = f64::from_be_bytes(s.try_into().expect("took 8 bytes"));
                    self.leaf(Value::Float(v));
                }
                b'S' => {
                    let s = self.line()?;
                    let v = unquote_py2(s).ok_or_else(|| self.err(format!("bad STRING {s:?}")))?;
                    self.leaf(Value::Str(Self::str_from_py2(&v)));
                }
                b'T' | b'U' => {
                    let n = if op == b'U' {
                        self.u8()? as usize
                    } else {
                        self.le(4)? as usize
                    };
                    let s = self.take(n)?;
                    self.leaf(Value::Str(Self::str_from_py2(s)));
                }
                b'V' => {
                    // raw-unicode-escape: non-ASCII Latin-1 characters are raw bytes
                    let s = self.line_bytes()?;
                    let v = raw_unicode_unescape(s)
                        .ok_or_else(|| self.err(format!("bad UNICODE {s:?}")))?;
                    self.leaf(Value::Str(v));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => self.u8()? as usize,
                        b'X' => self.le(4)? as usize,
                        _ => self.le(8)? as usize,
                    };
                    let s = self.take(n)?;
                    let v = self.utf8(s)?;
                    self.leaf(Value::Str(v));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'C' => self.u8()? as usize,
                        b'B' => self.le(4)? as usize,
                        _ => self.le(8)? as usize,
                    };
                    let s = self.take(n)?.to_vec();
                    self.leaf(Value::Bytes(s));
                }
                b']' => self.push(Node::List(vec![])),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.extend_list(l, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.extend_list(l, items)?;
                }
                b')' => self.push(Node::Tuple(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items));
                }
                b'}' => self.push(Node::Dict(vec![])),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Dict(vec![]));
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                0x8f => self.push(Node::Set(vec![])),
                0x90 => {
                    let items = self.pop_mark()?;
                    let s = self.top()?;
                    match &mut self.nodes[s] {
                        Node::Set(v) => v.extend(items),
                        _ => return Err(self.err("ADDITEMS to something that is not a set")),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items));
                }
                b'p' => {
                    let s = self.line()?;
                    let k = s.parse().map_err(|_| self.err(format!("bad PUT {s:?}")))?;
                    self.memo_put(k)?;
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.le(4)?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'g' => {
                    let s = self.line()?;
                    let k = s.parse().map_err(|_| self.err(format!("bad GET {s:?}")))?;
                    self.memo_get(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.le(4)?;
                    self.memo_get(k)?;
                }
                b'c' | 0x93 | b'R' | b'b' | b'i' | b'o' | 0x81 | 0x92 | b'P' | b'Q' | 0x82
                | 0x83 | 0x84 | 0x96 | 0x97 | 0x98 => {
                    return Err(Error::Unsupported(format!(
                        "pickle at byte {}: opcode 0x{op:02x} builds an object or calls a \
                         function; only plain data (dict, list, str, int, ...) is read",
                        self.op_at
                    )))
                }
                _ => return Err(self.err(format!("unknown opcode 0x{op:02x}"))),
            }
        }
    }

    fn value(&self, i: usize, depth: usize, budget: &mut usize) -> Result<Value> {
        if *budget == 0 {
            return Err(Error::arg(
                "pickle",
                format!(
                    "expands to more than {EXPANSION} values per byte (shared containers \
                     repeated over and over?)"
                ),
            ));
        }
        *budget -= 1;
        if depth > MAX_DEPTH {
            return Err(Error::arg(
                "pickle",
                format!("nesting deeper than {MAX_DEPTH} (a container that holds itself?)"),
            ));
        }
        let mut many = |v: &[usize]| -> Result<Vec<Value>> {
            v.iter()
                .map(|&j| self.value(j, depth + 1, budget))
                .collect()
        };
        Ok(match &self.nodes[i] {
            Node::Leaf(v) => v.clone(),
            Node::List(v) => Value::List(many(v)?),
            Node::Tuple(v) => Value::Tuple(many(v)?),
            Node::Set(v) => Value::Set(many(v)?),
            Node::Dict(kv) => {
                let mut out = Vec::with_capacity(kv.len());
                for &(k, v) in kv {
                    let k = self.value(k, depth + 1, budget)?;
                    out.push((k, self.value(v, depth + 1, budget)?));
                }
                Value::Dict(out)
            }
        })
    }
}

/// Python 2 `repr` of a str, as protocol 0's STRING writes it: quoted, with `\\`,
/// `\'`, `\"`, `\n`, `\r`, `\t` and `\xNN` escapes.
fn unquote_py2(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() < 2 || b[0] != b[b.len() - 1] || !(b[0] == b'\'' || b[0] == b'"') {
        return None;
    }
    let inner = &b[1..b.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        if inner[i] != b'\\' {
            out.push(inner[i]);
            i += 1;
            continue;
        }
        let c = *inner.get(i + 1)?;
        i += 2;
        match c {
            b'\\' | b'\'' | b'"' => out.push(c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'x' => {
                let hex = std::str::from_utf8(inner.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Python's `raw-unicode-escape`: `\uXXXX` and `\UXXXXXXXX` escapes, every other
/// byte a Latin-1 character.
fn raw_unicode_unescape(b: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && (b[i + 1] == b'u' || b[i + 1] == b'U') {
            let n = if b[i + 1] == b'u' { 4 } else { 8 };
            let hex = std::str::from_utf8(b.get(i + 2..i + 2 + n)?).ok()?;
            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            i += 2 + n;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    Some(out)
}

/// Parse a pickle held in memory.
pub fn parse(bytes: &[u8]) -> Result<Value> {
    let mut vm = Vm {
        b: bytes,
        p: 0,
        op_at: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        memo: Default::default(),
    };
    let root = vm.run()?;
    let mut budget = EXPANSION * bytes.len() + 1024;
    vm.value(root, 0, &mut budget)
}

/// Read a pickle file; errors name the file.
pub fn load(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        field: "(pickle)".into(),
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python2_protocol2_short_binstring_and_memo() {
        // cPickle.dumps([{'a': 'x'}, {'a': 'y'}], 2) in Python 2: the key 'a' is
        // memoized once and fetched with BINGET the second time
        let b = b"\x80\x02]q\x00(}q\x01U\x01aq\x02U\x01xq\x03s}q\x04h\x02U\x01yse.";
        let v = parse(b).unwrap();
        let items = v.as_seq().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].get("a").unwrap().as_str(), Some("x"));
        assert_eq!(items[1].get("a").unwrap().as_str(), Some("y"));
    }

    #[test]
    fn protocol0_text_opcodes() {
        // pickle.dumps({'k': [1, 'é', 2.5, True]}, 0) in Python 2 (str 'k', unicode é)
        let b = b"(dp0\nS'k'\np1\n(lp2\nI1\naV\\u00e9\np3\naF2.5\naI01\naV\xe8\np4\nas.";
        let v = parse(b).unwrap();
        let l = v.get("k").unwrap().as_seq().unwrap();
        assert_eq!(l[0], Value::Int(1));
        assert_eq!(l[1], Value::Str("é".into()));
        assert_eq!(l[2], Value::Float(2.5));
        assert_eq!(l[3], Value::Bool(true));
        // Python 3 writes Latin-1 characters of a str as raw bytes
        assert_eq!(l[4], Value::Str("è".into()));
    }

    #[test]
    fn memo_aliases_a_list_filled_after_it_was_stored() {
        // [L, L] where L = [7]: EMPTY_LIST, MEMOIZE(0), MARK, EMPTY_LIST, MEMOIZE(1),
        // BININT1 7, APPEND, GET 1, APPENDS, STOP
        let b = b"\x80\x04]\x94(]\x94K\x07ah\x01e.";
        let v = parse(b).unwrap();
        let inner = Value::List(vec![Value::Int(7)]);
        assert_eq!(v, Value::List(vec![inner.clone(), inner]));
    }

    #[test]
    fn objects_and_garbage_are_errors_not_panics() {
        // cos\nsystem\n... : GLOBAL must be refused
        assert!(matches!(
            parse(b"cos\nsystem\n(S'echo'\ntR."),
            Err(Error::Unsupported(_))
        ));
        for bad in [
            &b""[..],
            b"\x80\x02",
            b"\x80\x02]q",
            b"\x80\x02a.",
            b"\xff",
            b"X\xff\xff",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // L0 = [], L(k+1) = [Lk, Lk] through the memo: 2^60 values from 300 bytes
        let mut b = b"\x80\x02]\x94".to_vec();
        for k in 0..60u8 {
            b.extend_from_slice(&[b'(', b'h', k, b'h', k, b'l', 0x94]);
        }
        b.push(b'.');
        let e = parse(&b).unwrap_err().to_string();
        assert!(e.contains("values per byte"), "{e}");
        // negative LONG1: -2 is 0xfe in one byte
        assert_eq!(parse(b"\x80\x02\x8a\x01\xfe.").unwrap(), Value::Int(-2));
    }
}
