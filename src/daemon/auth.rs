//! Who may use a daemon group, and for what.
//!
//! Any process of the server's worker user can reach a group's socket (a PHP or
//! CGI script as much as the server's own workers). So a daemon serves a
//! connection only once its peer proved the secret of a configuration
//! generation, and then runs only the applications mounted on its group, which
//! requests name by their index in the group's list.
//!
//! The secret is made by the server's root process for each generation (start-up
//! and each reload) before the workers fork, so that they inherit it in memory;
//! it reaches the supervisor and the daemons only through their configuration
//! pipes, and is never written to a file or the environment.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

use super::protocol::{Decoder, Encoder, ProtocolError};
use crate::common::config::{AppSpec, DaemonOptions, Interface};

/// Bytes in a generation's secret.
pub const SECRET_LEN: usize = 32;

/// A generation's secret. Its `Debug` form hides it, so that it never reaches a log.
#[derive(Clone)]
pub struct Secret([u8; SECRET_LEN]);

impl Secret {
    /// A fresh secret from the kernel's random generator.
    pub fn generate() -> io::Result<Secret> {
        let mut bytes = [0u8; SECRET_LEN];
        let mut got = 0;
        while got < SECRET_LEN {
            let rest = &mut bytes[got..];
            // SAFETY: getrandom writes at most rest.len() bytes into rest.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n > 0 {
                got += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ENOSYS) => {
                    std::fs::File::open("/dev/urandom")?.read_exact(rest)?;
                    got = SECRET_LEN;
                }
                _ => return Err(e),
            }
        }
        Ok(Secret(bytes))
    }

    /// The secret in `bytes`, if they have its length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Secret> {
        bytes.try_into().ok().map(Secret)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn encode(&self, e: &mut Encoder<'_>) {
        e.bytes(&self.0);
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Secret, ProtocolError> {
        Secret::from_bytes(d.bytes("secret")?)
            .ok_or_else(|| ProtocolError::Invalid("the secret has the wrong length".into()))
    }

    /// Whether `other` is this secret, in a time that does not depend on where
    /// they differ (a peer must not learn the secret byte by byte).
    pub fn matches(&self, other: &[u8]) -> bool {
        if other.len() != SECRET_LEN {
            return false;
        }
        let diff = self
            .0
            .iter()
            .zip(other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(&other.0)
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What the server processes of one configuration generation may ask of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAccess {
    pub secret: Secret,
    /// The applications mounted on the group: a request names one by its index.
    pub apps: Vec<AppSpec>,
}

impl GroupAccess {
    /// The index by which requests name `app`, if the group serves it.
    pub fn index_of(&self, app: &AppSpec) -> Option<u32> {
        self.apps.iter().position(|a| a == app).map(|i| i as u32)
    }

    pub fn encode(&self, e: &mut Encoder<'_>) {
        self.secret.encode(e);
        put_apps(e, &self.apps);
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<GroupAccess, ProtocolError> {
        Ok(GroupAccess {
            secret: Secret::decode(d)?,
            apps: decode_apps(d)?,
        })
    }
}

/// What the server processes of one configuration generation may ask of the
/// daemon groups: its secret, and each group's applications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub secret: Secret,
    /// Each group's applications, by group name, in the order requests index them.
    pub apps: BTreeMap<String, Vec<AppSpec>>,
}

impl Generation {
    /// A new generation with a fresh secret for `groups`, whose applications are
    /// given as (group name, application) pairs: one per mount, in any order,
    /// repeats and unknown groups ignored.
    pub fn new<'a>(
        groups: &[DaemonOptions],
        mounts: impl IntoIterator<Item = (&'a str, &'a AppSpec)>,
    ) -> io::Result<Generation> {
        let mut apps: BTreeMap<String, Vec<AppSpec>> = groups
            .iter()
            .map(|g| (g.name.clone(), Vec::new()))
            .collect();
        for (group, app) in mounts {
            if let Some(list) = apps.get_mut(group) {
                if !list.contains(app) {
                    list.push(app.clone());
                }
            }
        }
        Ok(Generation {
            secret: Secret::generate()
                .map_err(|e| io::Error::other(format!("cannot make a random secret: {e}")))?,
            apps,
        })
    }

    /// What this generation may ask of group `name`.
    pub fn access(&self, name: &str) -> GroupAccess {
        GroupAccess {
            secret: self.secret.clone(),
            apps: self.apps.get(name).cloned().unwrap_or_default(),
        }
    }

    pub fn encode(&self, e: &mut Encoder<'_>) {
        self.secret.encode(e);
        e.u32(self.apps.len() as u32);
        for (group, apps) in &self.apps {
            e.str(group);
            put_apps(e, apps);
        }
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Generation, ProtocolError> {
        let secret = Secret::decode(d)?;
        let n = d.count(8, "group applications")?;
        let apps = (0..n)
            .map(|_| Ok((d.str("group name")?.to_string(), decode_apps(d)?)))
            .collect::<Result<_, ProtocolError>>()?;
        Ok(Generation { secret, apps })
    }
}

fn put_apps(e: &mut Encoder<'_>, apps: &[AppSpec]) {
    e.u32(apps.len() as u32);
    for app in apps {
        e.bytes(app.file.as_os_str().as_encoded_bytes());
        e.str(&app.callable);
        e.u8(app.interface.code());
    }
}

fn decode_apps(d: &mut Decoder<'_>) -> Result<Vec<AppSpec>, ProtocolError> {
    use std::os::unix::ffi::OsStrExt;
    let n = d.count(9, "applications")?;
    (0..n)
        .map(|_| {
            let file = d.bytes("application file")?;
            let callable = d.str("callable")?;
            let interface = Interface::from_code(d.u8("interface")?)
                .ok_or_else(|| ProtocolError::Invalid("unknown application interface".into()))?;
            if file.is_empty() || callable.is_empty() {
                return Err(ProtocolError::Invalid(
                    "empty application file or callable".into(),
                ));
            }
            Ok(AppSpec {
                file: std::ffi::OsStr::from_bytes(file).into(),
                callable: callable.to_string(),
                interface,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn app(file: &str) -> AppSpec {
        AppSpec {
            file: PathBuf::from(file),
            callable: "application".into(),
            interface: Interface::Detect,
        }
    }

    #[test]
    fn secrets_are_random_and_compared_whole() {
        let (a, b) = (Secret::generate().unwrap(), Secret::generate().unwrap());
        assert_ne!(a, b);
        assert!(a.matches(a.as_bytes()));
        assert!(!a.matches(&a.as_bytes()[..SECRET_LEN - 1]));
        let mut flipped = a.as_bytes().to_vec();
        flipped[SECRET_LEN - 1] ^= 1;
        assert!(!a.matches(&flipped));
        assert_eq!(format!("{a:?}"), "Secret(..)");
    }

    #[test]
    fn generations_list_each_groups_apps_once_and_round_trip() {
        let groups = [
            DaemonOptions::parse(&["a"]).unwrap(),
            DaemonOptions::parse(&["b"]).unwrap(),
        ];
        let (x, y) = (app("/x.py"), app("/y.py"));
        let mounts = [("a", &x), ("nope", &y), ("a", &y), ("a", &x)];
        let g = Generation::new(&groups, mounts).unwrap();
        assert_eq!(g.access("a").apps, vec![x.clone(), y.clone()]);
        assert_eq!(g.access("a").index_of(&y), Some(1));
        assert!(g.access("b").apps.is_empty());
        let mut out = Vec::new();
        g.encode(&mut Encoder(&mut out));
        let mut d = Decoder::new(&out);
        assert_eq!(Generation::decode(&mut d).unwrap(), g);
        d.finish("generation").unwrap();
        for n in 0..out.len() {
            let mut d = Decoder::new(&out[..n]);
            assert!(Generation::decode(&mut d)
                .and_then(|_| d.finish("g"))
                .is_err());
        }
    }
}
