//! The one place where nix-cri's errors become gRPC statuses.

use tonic::Code;

use crate::cache::CacheError;
use crate::image::ReferenceError;
use crate::store::{StoreError, SubstituteError};

use super::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("{0}")]
    Substitute(Box<SubstituteError>),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Image(#[from] crate::image::ImageError),
    #[error("cannot decode {method} request: {why}")]
    BadRequest { method: &'static str, why: String },
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error(
        "image {image} is a nix image, but pod sandbox {sandbox} did not opt in: set \
         runtimeClassName: {handler} in the pod spec (RuntimeClass handler {handler:?})"
    )]
    NotOptedIn {
        image: String,
        sandbox: String,
        handler: String,
    },
    #[error("image {image} is not present: pull it first")]
    NotPulled { image: String },
    /// The runtime answered a call nix-cri made itself with an error; relayed as it came.
    #[error("{}", .0.message())]
    Upstream(Box<tonic::Status>),
    #[error("{0}")]
    Internal(String),
}

impl From<SubstituteError> for CriError {
    fn from(err: SubstituteError) -> Self {
        CriError::Substitute(Box::new(err))
    }
}

impl CriError {
    /// The runtime's own answer to a call nix-cri made.
    pub fn upstream(status: tonic::Status) -> Self {
        CriError::Upstream(Box::new(status))
    }

    pub fn code(&self) -> Code {
        match self {
            CriError::Reference(_) | CriError::BadRequest { .. } | CriError::Wire(_) => {
                Code::InvalidArgument
            }
            CriError::NotOptedIn { .. } => Code::FailedPrecondition,
            CriError::NotPulled { .. } => Code::NotFound,
            CriError::Upstream(status) => status.code(),
            CriError::Substitute(err) if matches!(**err, SubstituteError::NotFound { .. }) => {
                Code::NotFound
            }
            // kubelet reduces Unknown errors to their message and looks for these prefixes.
            CriError::Substitute(_) | CriError::Image(_) => Code::Unknown,
            CriError::Store(_) | CriError::Internal(_) => Code::Internal,
        }
    }

    /// The message on the wire. Pull failures kubelet knows by name get its prefixes
    /// (`SignatureValidationFailed`, `RegistryUnavailable`), as containerd and CRI-O give them.
    pub fn message(&self) -> String {
        let message = self.to_string();
        let CriError::Substitute(err) = self else {
            return message;
        };
        match &**err {
            SubstituteError::Unsigned { .. } => format!("SignatureValidationFailed: {message}"),
            SubstituteError::Cache { source, .. }
                if matches!(
                    **source,
                    CacheError::Connect { .. }
                        | CacheError::Stalled { .. }
                        | CacheError::Status { .. }
                ) =>
            {
                format!("RegistryUnavailable: {message}")
            }
            _ => message,
        }
    }

    pub fn into_response(self) -> http::Response<super::grpc::Body> {
        let code = self.code();
        let message = self.message();
        let message = super::grpc::bounded(&message);
        if code == Code::Internal || code == Code::Unknown {
            tracing::warn!(?code, %message, "CRI call failed");
        } else {
            tracing::debug!(?code, %message, "CRI call refused");
        }
        super::grpc::status_response(code, &message)
    }
}
