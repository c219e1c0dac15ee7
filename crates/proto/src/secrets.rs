//! A device's secrets as a deployment carries them (sealed to the device's key inside
//! its signed offer, `Offer::secrets`), and their bounds.

use serde::{Deserialize, Serialize};

/// The most bytes one secret's value may hold.
pub const MAX_VALUE: usize = 64 << 10;
/// The most secrets one device may have.
pub const MAX_SECRETS: usize = 64;

/// What a sealed `Offer::secrets` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secrets {
    pub device: String,
    pub deployment_id: String,
    pub secrets: Vec<Secret>,
}

/// One secret as the device writes it: `secrets_dir/NAME`, with its owner, group and
/// mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub name: String,
    pub owner: String,
    pub group: String,
    /// Permission bits, e.g. 0o400.
    pub mode: u32,
    /// The value, base64.
    pub value: String,
}

/// A deployment's sealed secrets as the agent keeps them (`STATE_DIR/secrets.json`;
/// an image the controller makes carries one, with its device key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub device: String,
    pub deployment_id: String,
    /// base64, as in the offer.
    pub sealed: String,
}

/// `STATE_DIR/secrets.json`: the current deployment's secrets and the previous one's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub current: Option<Sealed>,
    pub previous: Option<Sealed>,
}

/// The context a device's secrets are sealed under: this device, this deployment.
pub fn context(device: &str, deployment_id: &str) -> String {
    format!("thymis/secrets/v1\n{device}\n{deployment_id}")
}

/// A secret's name becomes a file name: plain, not hidden, not a path.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A user or group: a name as useradd takes it, or a number.
pub fn valid_account(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && (name.bytes().all(|b| b.is_ascii_digit())
            || (name.as_bytes()[0].is_ascii_lowercase() || name.starts_with('_'))
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_plain_files_and_accounts_plain_names() {
        for ok in ["wifi-psk", "api.token", "TLS_key"] {
            assert!(super::valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "../etc/shadow", "a/b", "x".repeat(65).as_str(), "with space"] {
            assert!(!super::valid_name(bad), "{bad}");
        }
        for ok in ["root", "kiosk", "_apt", "1000", "www-data"] {
            assert!(super::valid_account(ok), "{ok}");
        }
        for bad in ["", "Root", "a b", "x;rm", "-x"] {
            assert!(!super::valid_account(bad), "{bad}");
        }
    }
}
