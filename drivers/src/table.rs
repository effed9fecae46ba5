//! The table of named bdevs, their claims, and the drivers' create methods.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bdev::{Bdev, BdevError};
use crate::iostat::{CountedBdev, IoStat, IoStats};

/// What `bdev_get_bdevs` reports of one bdev.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BdevInfo {
    /// Name.
    pub name: String,
    /// Driver.
    pub driver: String,
    /// Bytes per block.
    pub block_size: u32,
    /// Number of blocks.
    pub num_blocks: u64,
    /// The pair or export holding it, if any.
    pub claimed_by: Option<String>,
}

/// What `bdev_get_iostat` reports of one bdev.
#[derive(Debug, Clone, Serialize)]
pub struct BdevIoStat {
    /// Name.
    pub name: String,
    /// Its counts.
    #[serde(flatten)]
    pub stat: IoStat,
}

struct Entry {
    /// The bdev as added, counted: every channel opened on it counts its requests in `stats`.
    bdev: Arc<dyn Bdev>,
    stats: Arc<IoStats>,
    claimed_by: Option<String>,
}

/// Named bdevs. A claimed bdev (a pair's volume) cannot be deleted or claimed again.
#[derive(Default)]
pub struct BdevTable {
    bdevs: BTreeMap<String, Entry>,
}

impl BdevTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a bdev under its name. Its channels count their requests from then on (see
    /// [`BdevTable::iostat`]), whoever opens them: exports, pairs, backups.
    pub fn add(&mut self, bdev: Arc<dyn Bdev>) -> Result<(), BdevError> {
        let name = bdev.name().to_string();
        if self.bdevs.contains_key(&name) {
            return Err(BdevError::Exists(name));
        }
        let stats = IoStats::new(true);
        let bdev = Arc::new(CountedBdev::new(bdev, Arc::clone(&stats)));
        self.bdevs.insert(
            name,
            Entry {
                bdev,
                stats,
                claimed_by: None,
            },
        );
        Ok(())
    }

    /// The I/O statistics of every bdev, by name; or of just `name`.
    pub fn iostat(&self, name: Option<&str>) -> Result<Vec<BdevIoStat>, BdevError> {
        let stat = |(n, e): (&String, &Entry)| BdevIoStat {
            name: n.clone(),
            stat: e.stats.snapshot(),
        };
        match name {
            Some(n) => {
                let (n, e) = self
                    .bdevs
                    .get_key_value(n)
                    .ok_or_else(|| BdevError::NotFound(n.to_string()))?;
                Ok(vec![stat((n, e))])
            }
            None => Ok(self.bdevs.iter().map(stat).collect()),
        }
    }

    /// The bdev of that name.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        self.bdevs
            .get(name)
            .map(|e| Arc::clone(&e.bdev))
            .ok_or_else(|| BdevError::NotFound(name.to_string()))
    }

    /// Every bdev.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Bdev>> {
        self.bdevs.values().map(|e| &e.bdev)
    }

    /// True when a bdev of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.bdevs.contains_key(name)
    }

    /// Removes an unclaimed bdev.
    pub fn delete(&mut self, name: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        let entry = self
            .bdevs
            .get(name)
            .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        if let Some(by) = &entry.claimed_by {
            return Err(BdevError::Claimed {
                name: name.to_string(),
                by: by.clone(),
            });
        }
        self.bdevs
            .remove(name)
            .map(|e| e.bdev)
            .ok_or_else(|| BdevError::NotFound(name.to_string()))
    }

    /// Marks a bdev as held by `by`.
    pub fn claim(&mut self, name: &str, by: &str) -> Result<Arc<dyn Bdev>, BdevError> {
        let entry = self
            .bdevs
            .get_mut(name)
            .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        if let Some(holder) = &entry.claimed_by {
            return Err(BdevError::Claimed {
                name: name.to_string(),
                by: holder.clone(),
            });
        }
        entry.claimed_by = Some(by.to_string());
        Ok(Arc::clone(&entry.bdev))
    }

    /// Fails when the bdev is missing or claimed (checked before a claim has side effects).
    pub fn check_unclaimed(&self, name: &str) -> Result<(), BdevError> {
        let entry = self
            .bdevs
            .get(name)
            .ok_or_else(|| BdevError::NotFound(name.to_string()))?;
        match &entry.claimed_by {
            Some(holder) => Err(BdevError::Claimed {
                name: name.to_string(),
                by: holder.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Releases a claim made by `by`.
    pub fn release(&mut self, name: &str, by: &str) {
        if let Some(e) = self.bdevs.get_mut(name) {
            if e.claimed_by.as_deref() == Some(by) {
                e.claimed_by = None;
            }
        }
    }

    /// Every bdev, by name; or just `name`.
    pub fn list(&self, name: Option<&str>) -> Result<Vec<BdevInfo>, BdevError> {
        let info = |e: &Entry| {
            let g = e.bdev.geometry();
            BdevInfo {
                name: e.bdev.name().to_string(),
                driver: e.bdev.driver().to_string(),
                block_size: g.block_size,
                num_blocks: g.num_blocks,
                claimed_by: e.claimed_by.clone(),
            }
        };
        match name {
            Some(n) => Ok(vec![info(
                self.bdevs
                    .get(n)
                    .ok_or_else(|| BdevError::NotFound(n.to_string()))?,
            )]),
            None => Ok(self.bdevs.values().map(info).collect()),
        }
    }

    /// The create calls that rebuild every bdev, for `save_config`.
    pub fn config(&self) -> Vec<serde_json::Value> {
        self.bdevs.values().map(|e| e.bdev.config()).collect()
    }
}

/// Why a create method failed: its parameters, or the driver.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The parameters do not parse (the message names the parameter).
    #[error("{0}")]
    Params(String),
    /// The driver refused.
    #[error(transparent)]
    Bdev(#[from] BdevError),
}

/// A driver's create method: JSON parameters in, a bdev out.
pub type CreateFn = fn(serde_json::Value) -> Result<Arc<dyn Bdev>, CreateError>;

/// The create methods of every driver, by RPC method name.
#[derive(Default)]
pub struct DriverRegistry {
    creators: Vec<(&'static str, CreateFn)>,
}

impl DriverRegistry {
    /// Adds a driver's create method.
    pub fn add(&mut self, method: &'static str, create: CreateFn) {
        self.creators.push((method, create));
    }

    /// The create method registered under `method`.
    pub fn get(&self, method: &str) -> Option<CreateFn> {
        self.creators
            .iter()
            .find(|(m, _)| *m == method)
            .map(|(_, f)| *f)
    }

    /// Registered method names.
    pub fn methods(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.creators.iter().map(|(m, _)| *m)
    }
}

/// Parses RPC parameters, naming the offending parameter on error.
pub fn parse_params<T: DeserializeOwned>(params: serde_json::Value) -> Result<T, CreateError> {
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            CreateError::Params(e.into_inner().to_string())
        } else {
            CreateError::Params(format!("parameter '{}': {}", path, e.into_inner()))
        }
    })
}

/// Registers the create methods of the drivers built here.
pub fn register(reg: &mut DriverRegistry) {
    reg.add("bdev_malloc_create", |params| {
        let p = parse_params(params)?;
        Ok(Arc::new(crate::malloc::rpc::create(&p)?))
    });
    reg.add("bdev_uring_create", |params| {
        let p = parse_params(params)?;
        Ok(Arc::new(crate::uring::rpc::create(&p)?))
    });
}
