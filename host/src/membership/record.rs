//! The membership record, `\0ballot/members`, lives in the pure crate
//! `ballot-control` (the simulator drives it too); here, why a change was
//! refused or has not finished.

pub use ballot_control::members::{
    check, Action, Done, Member, MemberChange, MembersRecord, Role, MEMBERS_FORMAT,
};

/// Why a membership change was refused or has not finished.
#[derive(Debug)]
pub enum ChangeError {
    Invalid(String),
    Unavailable(String),
}

impl From<crate::system_record::Unavailable> for ChangeError {
    fn from(e: crate::system_record::Unavailable) -> ChangeError {
        ChangeError::Unavailable(e.0)
    }
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeError::Invalid(m) | ChangeError::Unavailable(m) => f.write_str(m),
        }
    }
}
