//! Sandbox profiles: how each kind of service provider the sandbox imitates behaves, as data.
//! `default` is RFC 7644 as written; the vendor ones reproduce the quirks scimsync's
//! compatibility modes exist for; `nauthera`, `oauth42` and `lumoauth` behave as the three
//! service providers in the seeds' documentation describe themselves.

/// What DELETE of a user does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserDelete {
    Delete,
    /// The user stays, inactive (Slack).
    Deactivate,
    /// 405: users are never deleted (Salesforce).
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxProfile {
    Default,
    Aws,
    Slack,
    Salesforce,
    Webex,
    /// OAuth client_credentials with the `admin` scope (403 without it); discovery open.
    Nauthera,
    /// No PUT (updates by PATCH) and no Groups endpoint.
    Oauth42,
    /// Under an organisation path; no PUT on Groups.
    Lumoauth,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub base_path: &'static str,
    pub spc_path: &'static str,
    /// What the ServiceProviderConfig says of filtering (filters work regardless).
    pub advertise_filter: bool,
    pub groups: bool,
    pub put_users: bool,
    pub put_groups: bool,
    pub user_delete: UserDelete,
    /// Groups read back carry members.
    pub members_in_reads: bool,
    /// `replace` of members is refused.
    pub no_member_replace: bool,
    /// Member values accepted in one request (a group's POST or one PATCH).
    pub max_member_values: Option<usize>,
    /// Every member must carry this `type`.
    pub member_type: Option<&'static str>,
    /// Users need name.givenName, name.familyName and displayName.
    pub require_names: bool,
    /// Multi-valued attributes take one value.
    pub single_valued: bool,
    /// Writes accepted per second before 429 with Retry-After.
    pub write_rate: Option<usize>,
    /// Scope an OAuth token needs for resources (403 without it).
    pub required_scope: Option<&'static str>,
}

impl SandboxProfile {
    pub fn rules(self) -> Rules {
        let default = Rules {
            base_path: "/scim/v2",
            spc_path: "ServiceProviderConfig",
            advertise_filter: true,
            groups: true,
            put_users: true,
            put_groups: true,
            user_delete: UserDelete::Delete,
            members_in_reads: true,
            no_member_replace: false,
            max_member_values: None,
            member_type: None,
            require_names: false,
            single_valued: false,
            write_rate: None,
            required_scope: None,
        };
        match self {
            SandboxProfile::Default => default,
            SandboxProfile::Aws => Rules {
                put_groups: false,
                members_in_reads: false,
                no_member_replace: true,
                max_member_values: Some(100),
                require_names: true,
                single_valued: true,
                ..default
            },
            SandboxProfile::Slack => Rules {
                advertise_filter: false,
                user_delete: UserDelete::Deactivate,
                write_rate: Some(20),
                ..default
            },
            SandboxProfile::Salesforce => Rules {
                spc_path: "ServiceProviderConfigs",
                user_delete: UserDelete::Refuse,
                ..default
            },
            SandboxProfile::Webex => Rules {
                member_type: Some("user"),
                ..default
            },
            SandboxProfile::Nauthera => Rules {
                required_scope: Some("admin"),
                ..default
            },
            SandboxProfile::Oauth42 => Rules {
                groups: false,
                put_users: false,
                put_groups: false,
                ..default
            },
            SandboxProfile::Lumoauth => Rules {
                base_path: "/orgs/acme/api/v1/scim/v2",
                put_groups: false,
                ..default
            },
        }
    }
}
