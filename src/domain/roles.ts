// Users and roles (product spec, section 2). Pure rules; the users come from the configuration.

export const Roles = ['BackupAdministrator', 'BackupOperator', 'RestoreOperator', 'BackupViewer'] as const;
export type Role = (typeof Roles)[number];

export type Permission = 'failover' | 'replicate' | 'administer' | 'view';

/** Job runs need replicate; proxy changes administer; every failover operation and decision failover. */
export const permissionFor = (operation: string): Permission =>
  operation === 'replicationJob' ? 'replicate' : operation === 'setProxyOnline' ? 'administer' : 'failover';

export type AccessCheck = { allowed: true } | { allowed: false; reason: string };

/** Failover operations need Backup Administrator, or Backup Operator and Restore Operator together. */
export function checkAccess(user: string, roles: readonly Role[] | undefined, permission: Permission): AccessCheck {
  if (roles === undefined) return { allowed: false, reason: `unknown user '${user}'` };
  const has = (role: Role) => roles.includes(role);
  const allowed =
    has('BackupAdministrator') ||
    (permission === 'failover' && has('BackupOperator') && has('RestoreOperator')) ||
    (permission === 'replicate' && has('BackupOperator')) ||
    (permission === 'view' && roles.length > 0);
  if (allowed) return { allowed: true };
  const needs: Record<Permission, string> = {
    failover: 'Backup Administrator, or both Backup Operator and Restore Operator',
    administer: 'Backup Administrator',
    replicate: 'Backup Administrator or Backup Operator',
    view: 'any role',
  };
  const held = roles.length ? roles.join(', ') : 'no role';
  return { allowed: false, reason: `user '${user}' holds ${held}; this needs ${needs[permission]}` };
}
