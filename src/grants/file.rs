//! The grant book's file. Format 2 is written straight from the book's slots and read
//! straight into them, row by row, with no copy of the rows in between (a million
//! grants are a 64 MB file); format 1, what knockgate wrote before, is still read.
//!
//! A file that is torn, names a service or holder its tables lack, names an id or a
//! hole twice, or is of another version is damaged: none of it is booked, and the
//! start reads the kernel's sets back instead.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::book::{GrantBook, Names, Slot};
use super::{GrantId, GrantRecord, WindowRecord, new_id, parse_id};
use crate::policy::canonical;
use crate::state::{StateError, write_atomically};

/// The book file's format version.
const BOOK_FORMAT: u32 = 2;

/// The fewest bytes a format 2 row takes with its times in this century:
/// `["0a1b2c3d",0,"1.2.3.4",0,1800000000000,1800000060000],`.
const MIN_ROW_BYTES: usize = 56;

impl GrantBook {
    /// Reads the book saved in `path`; a missing file is an empty book.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::from_file(bytes, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::File {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The book in `bytes`, read from `path` (which the error names). The bytes are
    /// dropped once the rows are read, before the indexes are built: with a million
    /// grants they are 64 MB.
    pub fn from_file(bytes: Vec<u8>, path: &Path) -> Result<Self, StateError> {
        let rows = Self::read_rows(&bytes);
        drop(bytes);
        rows.and_then(|(book, unnamed)| book.finish_load(unnamed))
            .ok_or_else(|| StateError::Damaged {
                path: path.to_owned(),
            })
    }

    /// The book a file's `text` holds, or `None` if it is damaged.
    #[cfg(test)]
    pub(super) fn from_text(text: &[u8]) -> Option<Self> {
        let (book, unnamed) = Self::read_rows(text)?;
        book.finish_load(unnamed)
    }

    /// The grants and windows a file's `text` holds, not yet indexed, and the grants
    /// whose ids are not as knockgate writes them; `None` if it is damaged.
    fn read_rows(text: &[u8]) -> Option<(Self, Vec<Slot>)> {
        let mut book = Self::default();
        // A row is at least ~56 bytes: room for that many grants up front spares the
        // slots growing (each growth copies all and briefly holds both).
        book.reserve(text.len() / MIN_ROW_BYTES);
        let mut unnamed = Vec::new();
        let mut reader = serde_json::Deserializer::from_slice(text);
        let read = BookV2 {
            book: &mut book,
            unnamed: &mut unnamed,
        }
        .deserialize(&mut reader)
        .and_then(|()| reader.end());
        if read.is_err() {
            return Self::from_v1(serde_json::from_slice(text).ok()?);
        }
        book.slots.shrink_to_fit();
        Some((book, unnamed))
    }

    /// A format 1 book (one object per grant, every name spelled out), and the
    /// slots of its grants whose ids are not as knockgate writes them.
    fn from_v1(saved: SavedV1) -> Option<(Self, Vec<Slot>)> {
        if saved.version.is_some() {
            return None;
        }
        let mut book = Self::default();
        let mut unnamed = Vec::new();
        for r in saved.grants {
            // A book written in whole seconds (knockgate 0.1): the same times in ms.
            let (granted, ends) = if r.expires_at_ms == 0 {
                (
                    r.granted_at.saturating_mul(1000),
                    r.expires_at.saturating_mul(1000),
                )
            } else {
                (r.granted_at_ms, r.expires_at_ms)
            };
            let slot = Slot {
                granted_ms: granted,
                ends_ms: ends,
                close_us: 0,
                id: 0,
                service: book.services.acquire(&r.service),
                who: book.holders.acquire(&r.who),
                address: canonical(r.address),
            };
            book.book_row(parse_id(&r.id), slot, &mut unnamed);
        }
        for w in saved.windows {
            if !book.book_window(w) {
                return None;
            }
        }
        Some((book, unnamed))
    }

    /// Books a grant read from a file (its names counted already), unindexed until
    /// the whole file is read; one whose id is not as knockgate writes ids waits in
    /// `unnamed` for a fresh one.
    fn book_row(&mut self, id: Option<GrantId>, slot: Slot, unnamed: &mut Vec<Slot>) {
        match id {
            Some(id) => self.slots.push(Slot { id, ..slot }),
            None => unnamed.push(slot),
        }
    }

    /// Books a window read from a file; `false` if its id is booked already.
    fn book_window(&mut self, mut w: WindowRecord) -> bool {
        if w.expires_at_ms == 0 {
            w.granted_at_ms = w.granted_at.saturating_mul(1000);
            w.expires_at_ms = w.expires_at.saturating_mul(1000);
        }
        if self.windows.contains_key(&w.id) {
            return false;
        }
        self.windows.insert(w.id.clone(), w);
        true
    }

    /// Indexes what was read and gives the unnamed grants fresh ids; `None` if an id
    /// or a hole is named twice or a window holds a grant's id.
    fn finish_load(mut self, unnamed: Vec<Slot>) -> Option<Self> {
        if !self.index_all() {
            return None;
        }
        for slot in unnamed {
            let id = self.fresh_id(&mut new_id);
            if !self.index_slot(Slot { id, ..slot }) {
                return None;
            }
        }
        let clash = self
            .windows
            .keys()
            .filter_map(|id| parse_id(id))
            .any(|id| self.by_id.contains_key(&id));
        if clash {
            return None;
        }
        self.rebuild_grant_ends();
        self.rebuild_window_ends();
        Some(self)
    }

    /// Saves the book to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        write_atomically(&path.with_extension("tmp"), path, &self.to_json())
    }

    /// The book as its file holds it (format 2).
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 * self.len() + 256);
        match serde_json::to_writer(&mut out, &SaveV2(self)) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }
}

/// The book as knockgate before format 2 saved it: one object per grant, every name
/// and time spelled out, pretty-printed — 254 bytes a grant.
#[derive(Deserialize, Default)]
struct SavedV1 {
    /// Format 1 has none: a file that names a version is of another format.
    #[serde(default)]
    version: Option<serde::de::IgnoredAny>,
    grants: Vec<GrantRecord>,
    #[serde(default)]
    windows: Vec<WindowRecord>,
}

/// Writes a book in format 2: `{"version":2,"services":[…],"holders":[…],"grants":
/// [[id, service#, address, holder#, granted_ms, ends_ms], …],"windows":[…]}`. The
/// tables are the book's own (an unused number's name is empty); the rows are its
/// slots, serialised as they are read.
struct SaveV2<'a>(&'a GrantBook);

impl Serialize for SaveV2<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let book = self.0;
        let mut out = serializer.serialize_struct("SavedV2", 5)?;
        out.serialize_field("version", &BOOK_FORMAT)?;
        out.serialize_field("services", &book.services.by_number)?;
        out.serialize_field("holders", &book.holders.by_number)?;
        out.serialize_field("grants", &GrantRows(&book.slots))?;
        out.serialize_field("windows", &WindowRows(book))?;
        out.end()
    }
}

struct GrantRows<'a>(&'a [Slot]);

impl Serialize for GrantRows<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|s| {
            (
                HexId(s.id),
                s.service,
                s.address,
                s.who,
                s.granted_ms,
                s.ends_ms,
            )
        }))
    }
}

struct WindowRows<'a>(&'a GrantBook);

impl Serialize for WindowRows<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.windows())
    }
}

/// An id written as [`super::id_text`] shows it, with no string made for it.
struct HexId(GrantId);

impl Serialize for HexId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:08x}", self.0))
    }
}

/// The fields of a format 2 file.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Version,
    Services,
    Holders,
    Grants,
    Windows,
    #[serde(other)]
    Other,
}

/// Reads a format 2 file into `book`. The tables must come before the rows (as
/// knockgate writes them): a row is booked as it is read.
struct BookV2<'a> {
    book: &'a mut GrantBook,
    unnamed: &'a mut Vec<Slot>,
}

impl<'de> DeserializeSeed<'de> for BookV2<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, reader: D) -> Result<(), D::Error> {
        reader.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BookV2<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a grant book of format 2")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut version = None;
        let (mut services, mut holders) = (None::<Vec<String>>, None::<Vec<String>>);
        let (mut grants, mut windows) = (false, false);
        let mut seen = Vec::new();
        while let Some(field) = map.next_key::<Field>()? {
            // A field twice is not a file knockgate wrote (a second `grants` would add
            // to the first; a second table would renumber the rows after it).
            if field != Field::Other {
                if seen.contains(&field) {
                    return Err(de::Error::custom("a field twice"));
                }
                seen.push(field);
            }
            match field {
                Field::Version => version = Some(map.next_value::<u32>()?),
                Field::Services => services = Some(map.next_value()?),
                Field::Holders => holders = Some(map.next_value()?),
                Field::Grants => {
                    let (Some(services), Some(holders), Some(BOOK_FORMAT)) =
                        (&services, &holders, version)
                    else {
                        return Err(de::Error::custom("grant rows before their tables"));
                    };
                    map.next_value_seed(Rows {
                        book: &mut *self.book,
                        unnamed: &mut *self.unnamed,
                        services: TableMap::new(services),
                        holders: TableMap::new(holders),
                    })?;
                    grants = true;
                }
                Field::Windows => {
                    for w in map.next_value::<Vec<WindowRecord>>()? {
                        if !self.book.book_window(w) {
                            return Err(de::Error::custom("a window id twice"));
                        }
                    }
                    windows = true;
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if version == Some(BOOK_FORMAT) && grants && windows {
            Ok(())
        } else {
            Err(de::Error::custom("not a whole book of format 2"))
        }
    }
}

/// A file's name table, mapped onto the book's as rows use it.
struct TableMap<'a> {
    names: &'a [String],
    numbers: Vec<Option<u32>>,
}

impl<'a> TableMap<'a> {
    fn new(names: &'a [String]) -> Self {
        Self {
            names,
            numbers: vec![None; names.len()],
        }
    }

    /// The book's number for the file's name `index`, counted once more; `None` if
    /// the file's table has no such name.
    fn number(&mut self, index: usize, table: &mut Names) -> Option<u32> {
        let known = self.numbers.get_mut(index)?;
        if let Some(n) = *known {
            table.use_again(n);
            return Some(n);
        }
        let n = table.acquire(self.names.get(index)?);
        *known = Some(n);
        Some(n)
    }
}

/// The grant rows of a format 2 file, booked as they are read.
struct Rows<'a> {
    book: &'a mut GrantBook,
    unnamed: &'a mut Vec<Slot>,
    services: TableMap<'a>,
    holders: TableMap<'a>,
}

/// One grant in the file: id, service (index), address, who (index), granted and
/// ends (Unix ms).
type Row = (RowId, usize, IpAddr, usize, u64, u64);

impl<'de> DeserializeSeed<'de> for Rows<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, reader: D) -> Result<(), D::Error> {
        reader.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Rows<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("grant rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some((id, service, address, who, granted, ends)) = seq.next_element::<Row>()? {
            let (Some(service), Some(who)) = (
                self.services.number(service, &mut self.book.services),
                self.holders.number(who, &mut self.book.holders),
            ) else {
                return Err(de::Error::custom("a row names what the tables lack"));
            };
            let slot = Slot {
                granted_ms: granted,
                ends_ms: ends,
                close_us: 0,
                id: 0,
                service,
                who,
                address: canonical(address),
            };
            self.book.book_row(id.0, slot, self.unnamed);
        }
        Ok(())
    }
}

/// A row's id: `None` if it is not as knockgate writes ids (the grant gets a fresh
/// one).
struct RowId(Option<GrantId>);

impl<'de> Deserialize<'de> for RowId {
    fn deserialize<D: de::Deserializer<'de>>(reader: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = RowId;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a grant id")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<RowId, E> {
                Ok(RowId(parse_id(text)))
            }
        }
        reader.deserialize_str(Text)
    }
}
