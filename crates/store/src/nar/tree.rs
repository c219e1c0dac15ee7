//! An in-memory NAR tree, for tests, fuzzing and small generated paths. Entries live in
//! a `BTreeMap`, so the order the format demands holds by construction.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;

use super::encode::{write_str, write_tokens};
use super::{MAGIC, NarError, NarVisitor};

/// One node of a NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File { executable: bool, contents: Vec<u8> },
    Symlink { target: Vec<u8> },
    Directory(BTreeMap<Vec<u8>, Node>),
}

impl Node {
    /// The NAR serialisation of this tree.
    pub fn to_nar(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = write_str(&mut out, MAGIC).and_then(|()| self.write(&mut out));
        out
    }

    fn write<W: Write>(&self, w: &mut W) -> io::Result<()> {
        match self {
            Node::File { executable, contents } => {
                write_tokens(w, &["(", "type", "regular"])?;
                if *executable {
                    write_tokens(w, &["executable", ""])?;
                }
                write_tokens(w, &["contents"])?;
                write_str(w, contents)?;
                write_tokens(w, &[")"])
            }
            Node::Symlink { target } => {
                write_tokens(w, &["(", "type", "symlink", "target"])?;
                write_str(w, target)?;
                write_tokens(w, &[")"])
            }
            Node::Directory(entries) => {
                write_tokens(w, &["(", "type", "directory"])?;
                for (name, node) in entries {
                    write_tokens(w, &["entry", "(", "name"])?;
                    write_str(w, name)?;
                    write_tokens(w, &["node"])?;
                    node.write(w)?;
                    write_tokens(w, &[")"])?;
                }
                write_tokens(w, &[")"])
            }
        }
    }
}

/// A visitor that rebuilds the [`Node`] tree a NAR describes.
#[derive(Debug, Default)]
pub struct TreeBuilder {
    pub root: Option<Node>,
}

impl TreeBuilder {
    fn insert(&mut self, path: &Path, node: Node) {
        let mut comps: Vec<Vec<u8>> =
            path.components().map(|c| std::os::unix::ffi::OsStrExt::as_bytes(c.as_os_str()).to_vec()).collect();
        let Some(last) = comps.pop() else {
            self.root = Some(node);
            return;
        };
        let mut cur = self.root.as_mut();
        for c in comps {
            cur = match cur {
                Some(Node::Directory(entries)) => entries.get_mut(&c),
                _ => None,
            };
        }
        if let Some(Node::Directory(entries)) = cur {
            entries.insert(last, node);
        }
    }
}

impl NarVisitor for TreeBuilder {
    fn directory(&mut self, path: &Path) -> Result<(), NarError> {
        self.insert(path, Node::Directory(BTreeMap::new()));
        Ok(())
    }

    fn file(&mut self, path: &Path, executable: bool, _size: u64, contents: &mut dyn Read) -> Result<(), NarError> {
        let mut buf = Vec::new();
        contents.read_to_end(&mut buf).map_err(|source| NarError::Unpack { path: path.to_owned(), source })?;
        self.insert(path, Node::File { executable, contents: buf });
        Ok(())
    }

    fn symlink(&mut self, path: &Path, target: &[u8]) -> Result<(), NarError> {
        self.insert(path, Node::Symlink { target: target.to_vec() });
        Ok(())
    }
}
