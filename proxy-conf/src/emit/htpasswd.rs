//! htpasswd entries for the staging password. nginx's `auth_basic_user_file` checks `$6$`
//! (SHA-512-crypt) entries with the system's crypt(3), which glibc and libxcrypt provide; unlike
//! `{SHA}`/`$apr1$` it is salted and iterated, so it is the one to write. The salt is exactly
//! 16 characters: crypt(3) cuts longer salts to 16, so a longer one would never compare equal.

use sha_crypt::{PasswordHasher as _, ShaCrypt};

/// Random bytes of salt; their crypt-base64 form is the 16 characters SHA-crypt uses.
const SALT_BYTES: usize = 12;

/// Why no entry could be made.
#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    /// The user name cannot be written into an htpasswd line.
    #[error("user name {0:?} cannot contain ':' or a newline, or be empty")]
    BadUser(String),
    /// The password is empty or spans lines.
    #[error("the password is empty or contains a newline")]
    BadPassword,
    /// The hash could not be computed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// One `user:$6$salt$hash` line, without the newline.
pub fn entry(user: &str, password: &str) -> Result<String, HtpasswdError> {
    if user.is_empty() || user.contains([':', '\n', '\r']) {
        return Err(HtpasswdError::BadUser(user.to_owned()));
    }
    if password.is_empty() || password.contains(['\n', '\r']) {
        return Err(HtpasswdError::BadPassword);
    }
    let mut salt = [0u8; SALT_BYTES];
    getrandom::fill(&mut salt).map_err(|e| HtpasswdError::Hash(e.to_string()))?;
    let hash = ShaCrypt::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(|e| HtpasswdError::Hash(e.to_string()))?;
    Ok(format!("{user}:{hash}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha_crypt::PasswordVerifier as _;

    #[test]
    fn entries_are_salted_sha512_crypt_that_verify() {
        let line = entry("alice", "correct horse").unwrap();
        let (user, hash) = line.split_once(':').unwrap();
        assert_eq!(user, "alice");
        assert!(hash.starts_with("$6$"), "{hash}");
        let salt = hash
            .trim_start_matches("$6$")
            .trim_start_matches("rounds=5000$");
        assert_eq!(salt.split('$').next().unwrap().len(), 16, "{hash}");
        let parsed = sha_crypt::PasswordHashRef::new(hash).unwrap();
        ShaCrypt::default()
            .verify_password(b"correct horse", parsed)
            .unwrap();
        assert_ne!(line, entry("alice", "correct horse").unwrap());
        assert!(entry("a:b", "x").is_err());
        assert!(entry("a", "").is_err());
    }
}
