//! Vendor compatibility profiles: what each `compatibility` mode changes, as data. The engine
//! and the client read these fields; nothing else asks which vendor a target is.

use crate::config::Compatibility;

/// What leaving scope does to a user on this vendor, whatever `on_delete` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserRemoval {
    /// As configured by `on_delete`.
    AsConfigured,
    /// Always deactivate (PATCH/PUT active=false): the vendor does not delete users.
    Deactivate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub mode: Compatibility,
    /// Path of the ServiceProviderConfig endpoint under the base URL.
    pub spc_path: &'static str,
    /// Filtering works whatever the ServiceProviderConfig says.
    pub filter_works: bool,
    /// The vendor accepts PUT on groups.
    pub put_groups: bool,
    /// Groups read back carry their members (else the member set is known only locally).
    pub members_returned: bool,
    /// Member changes may use `replace` of `members` (else only add/remove with paths).
    pub replace_members: bool,
    /// Member values in one request.
    pub max_members_per_request: usize,
    /// Members a group may be created with; the rest follow by PATCH.
    pub create_group_max_members: Option<usize>,
    pub user_removal: UserRemoval,
    /// The vendor's DELETE of a user only deactivates it (the object stays remotely).
    pub delete_deactivates: bool,
    /// `type` set on every group member value (e.g. "user").
    pub member_type: Option<&'static str>,
    /// Users must carry name.givenName, name.familyName and displayName.
    pub require_user_names: bool,
    /// Every multi-valued attribute carries exactly one value (the primary one).
    pub single_valued: bool,
    /// Listing /Groups pages through every group (startIndex and count, an exact
    /// totalResults), so a batch creating groups may read them all instead of looking each up.
    pub list_groups: bool,
}

impl Profile {
    pub fn for_mode(mode: Compatibility) -> Profile {
        let default = Profile {
            mode,
            spc_path: "ServiceProviderConfig",
            filter_works: false,
            put_groups: true,
            members_returned: true,
            replace_members: true,
            max_members_per_request: 1000,
            create_group_max_members: None,
            user_removal: UserRemoval::AsConfigured,
            delete_deactivates: false,
            member_type: None,
            require_user_names: false,
            single_valued: false,
            list_groups: true,
        };
        match mode {
            Compatibility::Default => default,
            Compatibility::Aws => Profile {
                put_groups: false,
                list_groups: false,
                members_returned: false,
                replace_members: false,
                max_members_per_request: 100,
                create_group_max_members: Some(100),
                require_user_names: true,
                single_valued: true,
                ..default
            },
            Compatibility::Slack => Profile {
                filter_works: true,
                list_groups: false,
                delete_deactivates: true,
                ..default
            },
            Compatibility::Salesforce => Profile {
                spc_path: "ServiceProviderConfigs",
                list_groups: false,
                user_removal: UserRemoval::Deactivate,
                ..default
            },
            Compatibility::Webex => Profile {
                member_type: Some("user"),
                list_groups: false,
                ..default
            },
        }
    }

    /// One line for `scimsync check`.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("SPC at /{}", self.spc_path)];
        if self.filter_works {
            parts.push("filtering assumed to work".into());
        }
        if !self.put_groups {
            parts.push("no PUT on groups".into());
        }
        if !self.members_returned {
            parts.push("group members tracked locally".into());
        }
        if !self.replace_members {
            parts.push("members only by add/remove".into());
        }
        parts.push(format!(
            "{} members per request",
            self.max_members_per_request
        ));
        if let Some(n) = self.create_group_max_members {
            parts.push(format!("groups created with at most {n} members"));
        }
        if self.user_removal == UserRemoval::Deactivate {
            parts.push("users deactivated, never deleted".into());
        }
        if self.delete_deactivates {
            parts.push("DELETE of a user deactivates it".into());
        }
        if let Some(t) = self.member_type {
            parts.push(format!("members typed {t:?}"));
        }
        if self.require_user_names {
            parts.push("users need givenName, familyName, displayName".into());
        }
        if self.single_valued {
            parts.push("one value per multi-valued attribute".into());
        }
        if !self.list_groups {
            parts.push("groups looked up one by one".into());
        }
        format!("{}: {}", self.mode, parts.join("; "))
    }
}
