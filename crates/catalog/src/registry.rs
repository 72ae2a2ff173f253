//! Pools registered by name in the state directory: `STATE/pools/NAME.json` holds the
//! pool directory. Registration is a small atomic file per pool.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io, CatalogError, Result};
use crate::names::{suggest, Name};
use crate::store::{remove_durable, write_atomic};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registration {
    pub name: String,
    pub dir: PathBuf,
}

pub struct Registry {
    root: PathBuf,
}

impl Registry {
    pub fn new(state_dir: &Path) -> Registry {
        Registry {
            root: state_dir.join("pools"),
        }
    }

    pub fn open_default() -> Registry {
        Registry::new(&crate::home::state_dir())
    }

    fn file(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }

    pub fn list(&self) -> Result<Vec<Registration>> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("reading {}", self.root.display()))(e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                let text =
                    std::fs::read_to_string(&p).map_err(io(format!("reading {}", p.display())))?;
                let r: Registration =
                    serde_json::from_str(&text).map_err(|e| CatalogError::BadCatalog {
                        path: p.display().to_string(),
                        reason: e.to_string(),
                    })?;
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<Registration> {
        Name::pool(name)?;
        let p = self.file(name);
        match std::fs::read_to_string(&p) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| CatalogError::BadCatalog {
                path: p.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let names = self.list()?;
                Err(CatalogError::NotFound {
                    kind: "pool",
                    name: name.to_string(),
                    hint: suggest(name, names.iter().map(|r| r.name.as_str())),
                })
            }
            Err(e) => Err(io(format!("reading {}", p.display()))(e)),
        }
    }

    pub fn add(&self, name: &str, dir: &Path) -> Result<Registration> {
        Name::pool(name)?;
        if self.file(name).exists() {
            return Err(CatalogError::Exists {
                kind: "pool",
                name: name.to_string(),
            });
        }
        let dir = std::fs::canonicalize(dir).map_err(io(format!("resolving {}", dir.display())))?;
        if let Some(other) = self.list()?.into_iter().find(|r| r.dir == dir) {
            return Err(CatalogError::Refused {
                reason: format!(
                    "{} is already registered as pool '{}'",
                    dir.display(),
                    other.name
                ),
            });
        }
        std::fs::create_dir_all(&self.root)
            .map_err(io(format!("creating {}", self.root.display())))?;
        let r = Registration {
            name: name.to_string(),
            dir,
        };
        let bytes = serde_json::to_vec_pretty(&r).map_err(|e| CatalogError::BadCatalog {
            path: self.file(name).display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.file(name), &bytes)?;
        Ok(r)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        self.get(name)?;
        remove_durable(&self.file(name))
    }
}
